"""Warnings that point at the user's line, not into nnxfit.

A fixed ``stacklevel`` is right for one call path only: the same callback warns from a hook
called by ``_hook`` called by ``_deliver`` called by ``loop.run`` called by ``fit``, and
the depth changes whenever the loop does. ``user_stacklevel`` walks the stack instead, to
the first frame outside nnxfit and the libraries it calls user code through (jax tracing a
step, ``contextlib``), so the warning names the user's file and line: the ``fit(...)`` call,
or the user's own callback or step when the warning is about it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings

_NNXFIT = os.path.dirname(os.path.abspath(__file__)) + os.sep
# Libraries whose frames sit between nnxfit and user code (jit tracing, context managers).
_THROUGH = ("jax", "jaxlib", "flax", "optax", "orbax")
_STDLIB_FILES = frozenset(os.path.abspath(m.__file__) for m in (contextlib, functools))


def _library_dirs() -> tuple[str, ...]:
    out = [_NNXFIT]
    for name in _THROUGH:
        mod = sys.modules.get(name)
        file = getattr(mod, "__file__", None)
        if file:
            out.append(os.path.dirname(os.path.abspath(file)) + os.sep)
    return tuple(out)


def _internal(filename: str, dirs: tuple[str, ...]) -> bool:
    if filename.startswith("<"):
        # <frozen importlib...> is Python's own; <stdin>, <ipython-input-...> are the user's.
        return filename.startswith("<frozen")
    path = os.path.abspath(filename)
    return path.startswith(dirs) or path in _STDLIB_FILES


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a ``warnings.warn`` call in the caller of this function
    point at the first frame outside nnxfit (and the libraries it runs user code through).
    With no such frame (a thread nnxfit started), the outermost frame."""
    dirs = _library_dirs()
    frame = sys._getframe(1)  # the caller: what stacklevel=1 names
    level = 1
    while frame is not None and _internal(frame.f_code.co_filename, dirs):
        if frame.f_back is None:
            return level
        frame = frame.f_back
        level += 1
    return level


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` pointing at the user's line (``user_stacklevel``)."""
    warnings.warn(message, category, stacklevel=user_stacklevel())
