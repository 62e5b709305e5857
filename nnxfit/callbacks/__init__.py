"""Built-in callbacks. Each lives in its own module; this file only re-exports them."""

from nnxfit.callbacks.base import Callback, CallbackList
from nnxfit.callbacks.progress import ProgressBar
from nnxfit.callbacks.summary import ModelSummary, summarize
from nnxfit.callbacks.throughput import DataBottleneckWarning, ThroughputMonitor

__all__ = [
    "Callback",
    "CallbackList",
    "DataBottleneckWarning",
    "ModelSummary",
    "ProgressBar",
    "ThroughputMonitor",
    "summarize",
]
