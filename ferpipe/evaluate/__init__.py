"""How good a trained ensemble is: accuracy, confusion matrices, the paper's Table I, the misses, Grad-CAM.

Imports `ferpipe.model`, `ferpipe.preprocess` (image codecs), `ferpipe.data` and the base modules.
"""
