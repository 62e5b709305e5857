"""Built-in callbacks. Each lives in its own module; this file only re-exports them."""

from nnxfit.callbacks.base import Callback, CallbackList

__all__ = ["Callback", "CallbackList"]
