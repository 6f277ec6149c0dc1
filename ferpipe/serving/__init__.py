"""Serving: the final ensemble as one MLflow model that takes raw images, what one request may hold, batch
prediction, the Model Registry (and the hash each version's files are checked against), `ferpipe serve`.

A layer of its own, after crossval, rather than a module of `model`: the
training cache keys on the sources of `ferpipe.model` (crossval/member_cache.py),
so serving code living there would invalidate every trained member whenever
the serving side changed. Serving may import every package before it.
"""
