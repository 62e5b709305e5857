"""``warn_user``: a warning that points at the user's line, not into nnxfit or jax.

A fixed ``stacklevel`` breaks whenever the call path changes (a hook runs from the Trainer's
loop, a compile listener from inside jax): this counts the frames instead.
"""

from __future__ import annotations

import os
import sys
import warnings

import flax
import jax
import optax

import nnxfit

# Frames in these packages are never the user's line.
_LIBRARY_DIRS = tuple(
    os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (nnxfit, jax, optax, flax)
)


def _is_library(filename: str) -> bool:
    path = os.path.abspath(filename)
    return path.startswith(_LIBRARY_DIRS) or path.startswith("<frozen ")


def warn_user(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` with the stack level of the innermost frame outside nnxfit, jax,
    optax and flax (a callback's line, or the line that called ``fit``)."""
    frame, level = sys._getframe(1), 2  # level 2: warn_user's caller
    while frame is not None and _is_library(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level if frame is not None else 1)
