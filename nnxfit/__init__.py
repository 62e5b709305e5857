"""nnxfit: a fast, exact training loop for Flax NNX."""

from nnxfit.callbacks.base import Callback
from nnxfit.checkpoint import (
    CheckpointCorruptError,
    CheckpointInfo,
    CheckpointMismatchError,
    CheckpointWarning,
    ResumeWarning,
    load_checkpoint,
    read_meta,
)
from nnxfit.compile_watch import CompileWatch, RecompileWarning, enable_compilation_cache
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
    "CheckpointWarning",
    "CompileWatch",
    "ConfigError",
    "EmptyDataError",
    "History",
    "NnxfitError",
    "NonFiniteError",
    "RecompileWarning",
    "ResumeWarning",
    "StepOutputError",
    "Trainer",
    "TrainModule",
    "TrainingInterrupted",
    "__version__",
    "enable_compilation_cache",
    "load_checkpoint",
    "read_meta",
]
