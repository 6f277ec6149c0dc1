"""ferpipe: landmark-aware, part-based ensemble transfer learning for facial expression recognition."""

__version__ = "0.1.0"
