"""Moved to ``nnxfit.callbacks.compile_watch`` (it is a callback); this name keeps working."""

from nnxfit.callbacks.compile_watch import (
    CACHE_HIT_EVENT,
    COMPILE_EVENT,
    LOWER_EVENT,
    TRACE_EVENT,
    CompileRecord,
    CompileWatch,
    RecompileWarning,
    enable_compilation_cache,
)

__all__ = [
    "CACHE_HIT_EVENT",
    "COMPILE_EVENT",
    "LOWER_EVENT",
    "TRACE_EVENT",
    "CompileRecord",
    "CompileWatch",
    "RecompileWarning",
    "enable_compilation_cache",
]
