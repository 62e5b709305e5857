"""A fingerprint of the single-optimizer train programs: the md5 of their StableHLO text
(source locations removed), for two checkouts to compare. Equal fingerprints mean the device
runs the same program: a change to how the step is built (several optimizers, manual
optimization, ...) then costs the single-optimizer path nothing at run time.

Fits a tiny classifier for 8 steps, plain and with ``NaNGuard("skip")``, ``GradNormMonitor``,
``LearningRateMonitor``, ``EMA`` and ``grad_clip_norm``, and prints one line per train program
(one step, and a 2-step scan)::

    PYTHONPATH=$PWD .venv/bin/python benchmarks/step_hlo.py   # in each checkout, then diff
"""

from __future__ import annotations

import hashlib
import os
import sys
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from models import Classifier, toy_data  # noqa: E402

import nnxfit  # noqa: E402
from nnxfit.callbacks import EMA, GradNormMonitor, LearningRateMonitor, NaNGuard  # noqa: E402


def fingerprint(text: str) -> str:
    lines = [ln for ln in text.splitlines() if "loc(" not in ln and not ln.startswith("#loc")]
    return hashlib.md5("\n".join(lines).encode()).hexdigest()


def main() -> None:
    x, y = toy_data(64)
    data = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 64, 8)]
    sets = {
        "plain": ([], {}),
        "guarded": (
            [NaNGuard("skip"), GradNormMonitor(), LearningRateMonitor(), EMA()],
            {"grad_clip_norm": 1.0},
        ),
    }
    for name, (callbacks, kw) in sets.items():
        trainer = nnxfit.Trainer(max_steps=8, progress_bar=False, callbacks=callbacks, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(Classifier(), data)
        carry = trainer.carry
        batch = jax.tree.leaves(data[0])
        programs = carry.programs
        for kind, fn, b in (
            ("single", programs.train_single, batch),
            ("scan2", programs.train_multi, [np.stack([a, a]) for a in batch]),
        ):
            print(f"{name:8} {kind:6} {fingerprint(fn.lower(carry.leaves, b).as_text())}")


if __name__ == "__main__":
    main()
