"""nnxfit: a fast, exact training loop for Flax NNX."""

from nnxfit import metrics
from nnxfit.callbacks.base import Callback
from nnxfit.callbacks.compile_watch import (
    CompileWatch,
    RecompileWarning,
    enable_compilation_cache,
)
from nnxfit.checkpoint import (
    CheckpointCorruptError,
    CheckpointInfo,
    CheckpointMismatchError,
    CheckpointWarning,
    ResumeWarning,
    export_weights,
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
    ProcessSyncError,
    RollbackError,
    StepOutputError,
    TrainingInterrupted,
    WorkdirLockedError,
)
from nnxfit.history import History
from nnxfit.lr_finder import LRFindResult, LRFindWarning, lr_find
from nnxfit.modes import FrozenStatsCheck, TrainModeWarning, eval_mode
from nnxfit.module import TrainModule
from nnxfit.optimizers import UntrainedParamsWarning
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
    "FrozenStatsCheck",
    "History",
    "LRFindResult",
    "LRFindWarning",
    "NnxfitError",
    "NonFiniteError",
    "ProcessSyncError",
    "RecompileWarning",
    "ResumeWarning",
    "RollbackError",
    "StepOutputError",
    "Trainer",
    "TrainModule",
    "TrainModeWarning",
    "TrainingInterrupted",
    "UntrainedParamsWarning",
    "WorkdirLockedError",
    "__version__",
    "enable_compilation_cache",
    "eval_mode",
    "export_weights",
    "load_checkpoint",
    "lr_find",
    "metrics",
    "read_meta",
]
