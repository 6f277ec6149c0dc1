"""Serving: the final ensemble as one MLflow model that takes raw images, batch prediction, the Model Registry.

A layer of its own, after crossval, rather than a module of `model`: the
training cache keys on the sources of `ferpipe.model` (crossval/member_cache.py),
so serving code living there would invalidate every trained member whenever
the serving side changed. Serving may import every package before it.
"""
