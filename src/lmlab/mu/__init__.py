"""MU: the semantic-block transformer, its parameter-matched dense baseline, and their checkpoints."""

from lmlab.mu.checkpoint import load_checkpoint, save_checkpoint
from lmlab.mu.config import DenseConfig, MUConfig
from lmlab.mu.dense import DenseModel
from lmlab.mu.matching import count_parameters, match_dense
from lmlab.mu.model import MUModel

__all__ = [
    "DenseConfig",
    "DenseModel",
    "MUConfig",
    "MUModel",
    "count_parameters",
    "load_checkpoint",
    "match_dense",
    "save_checkpoint",
]
