"""Built-in callbacks. Each lives in its own module; this file only re-exports them."""

from nnxfit.callbacks.base import Callback, CallbackList
from nnxfit.callbacks.checkpoint import ModelCheckpoint
from nnxfit.callbacks.csv_logger import CSVLogger
from nnxfit.callbacks.lambda_callback import LambdaCallback
from nnxfit.callbacks.progress import ProgressBar
from nnxfit.callbacks.summary import ModelSummary, summarize
from nnxfit.callbacks.tensorboard import TensorBoardLogger
from nnxfit.callbacks.throughput import DataBottleneckWarning, ThroughputMonitor

__all__ = [
    "Callback",
    "CallbackList",
    "CSVLogger",
    "LambdaCallback",
    "DataBottleneckWarning",
    "ModelCheckpoint",
    "ModelSummary",
    "ProgressBar",
    "TensorBoardLogger",
    "ThroughputMonitor",
    "summarize",
]
