"""nnxfit: a fast, exact training loop for Flax NNX."""

from nnxfit.callbacks.base import Callback
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
    "CheckpointError",
    "ConfigError",
    "EmptyDataError",
    "History",
    "NnxfitError",
    "NonFiniteError",
    "StepOutputError",
    "Trainer",
    "TrainModule",
    "TrainingInterrupted",
    "__version__",
]
