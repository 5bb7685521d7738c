"""lmlab: honest studies of efficient language-model methods (HyLoRADA, LatentWire, MU)."""

__version__ = "0.1.0"
