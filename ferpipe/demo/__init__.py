"""The SYNTHETIC demo dataset behind `make run`: made offline, in the JAFFE layout.

Not on any stage's path: nothing but the CLI imports it. Imports `ferpipe.data` only.
"""
