"""Warnings that point at the user's line, however deep inside nnxfit they are raised."""

from __future__ import annotations

import os
import sys
import warnings

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside the nnxfit package (the
    user's ``fit(...)`` line, say): a fixed ``stacklevel`` breaks whenever a call path
    gains or loses a frame."""
    level, frame = 2, sys._getframe(1)  # 2: the caller of this function
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
