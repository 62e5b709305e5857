"""Built-in callbacks. Each lives in its own module; this file only re-exports them."""

from nnxfit.callbacks.base import Callback, CallbackList
from nnxfit.callbacks.checkpoint import ModelCheckpoint
from nnxfit.callbacks.compile_watch import CompileWatch, RecompileWarning
from nnxfit.callbacks.csv_logger import CSVLogger
from nnxfit.callbacks.early_stopping import EarlyStopping
from nnxfit.callbacks.ema import EMA
from nnxfit.callbacks.grad_norm import GradNormMonitor, GradNormWarning
from nnxfit.callbacks.lambda_callback import LambdaCallback
from nnxfit.callbacks.lr_monitor import LearningRateMonitor, LearningRateWarning
from nnxfit.callbacks.mlflow_logger import MLflowLogger
from nnxfit.callbacks.monitor import Monitor
from nnxfit.callbacks.nan_guard import NaNGuard, NonFiniteWarning
from nnxfit.callbacks.profiler import Profiler
from nnxfit.callbacks.progress import ProgressBar
from nnxfit.callbacks.reduce_lr import ReduceLROnPlateau
from nnxfit.callbacks.spike_guard import SpikeGuard, SpikeWarning
from nnxfit.callbacks.summary import ModelSummary, summarize
from nnxfit.callbacks.tensorboard import TensorBoardLogger
from nnxfit.callbacks.throughput import DataBottleneckWarning, ThroughputMonitor
from nnxfit.callbacks.wandb_logger import WandbLogger
from nnxfit.callbacks.writer import LoggerCallback, Row, RunStart, RunWriter
from nnxfit.rollback import RollbackRecord, RollbackWarning

__all__ = [
    "Callback",
    "CallbackList",
    "CompileWatch",
    "CSVLogger",
    "DataBottleneckWarning",
    "EarlyStopping",
    "EMA",
    "GradNormMonitor",
    "GradNormWarning",
    "LambdaCallback",
    "LearningRateMonitor",
    "LearningRateWarning",
    "LoggerCallback",
    "MLflowLogger",
    "ModelCheckpoint",
    "ModelSummary",
    "Monitor",
    "NaNGuard",
    "NonFiniteWarning",
    "Profiler",
    "ProgressBar",
    "RecompileWarning",
    "ReduceLROnPlateau",
    "RollbackRecord",
    "RollbackWarning",
    "Row",
    "RunStart",
    "RunWriter",
    "SpikeGuard",
    "SpikeWarning",
    "TensorBoardLogger",
    "ThroughputMonitor",
    "WandbLogger",
    "summarize",
]
