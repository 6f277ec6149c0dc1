"""Datasets as they arrive: adapters for each layout, the manifest, folds, storage, fingerprints, the parts.

Owns the contracts every stage reads and writes (the manifest's columns and
statuses, a dataset directory on a local folder or an S3 prefix) and the
subject-independent fold plan. Imports only `ferpipe.errors` and `ferpipe.console`.
"""
