"""How good a trained ensemble is: accuracy, confusion matrices, the paper's Table I, Grad-CAM.

Imports `ferpipe.model`, `ferpipe.data` and the base modules.
"""
