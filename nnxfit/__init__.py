"""nnxfit: a fast, exact training loop for Flax NNX."""

from nnxfit.callbacks.base import Callback
from nnxfit.checkpoint import (
    CheckpointCorruptError,
    CheckpointInfo,
    CheckpointMismatchError,
    ResumeWarning,
    load_checkpoint,
    read_meta,
)
from nnxfit.errors import (
    BatchError,
    CheckpointError,
    ConfigError,
    EmptyDataError,
    NnxfitError,
    NonFiniteError,
    StepOutputError,
    TrainingInterrupted,
)
from nnxfit.history import History
from nnxfit.module import TrainModule
from nnxfit.trainer import Trainer

__version__ = "0.1.0"

__all__ = [
    "BatchError",
    "Callback",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointMismatchError",
    "ConfigError",
    "EmptyDataError",
    "History",
    "NnxfitError",
    "NonFiniteError",
    "ResumeWarning",
    "StepOutputError",
    "Trainer",
    "TrainModule",
    "TrainingInterrupted",
    "__version__",
    "load_checkpoint",
    "read_meta",
]
