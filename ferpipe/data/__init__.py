"""Datasets as they arrive: adapters for each layout, the manifest, folds, storage, fingerprints, the parts.

Owns the contracts every stage reads and writes (the manifest's columns and
statuses, a dataset directory on a local folder or an S3 prefix, `shards` that
cut a dataset by image id and the `packs` that hold a shard's pixels) and the
subject-independent fold plan. Imports only `ferpipe.errors` and `ferpipe.console`.
"""
