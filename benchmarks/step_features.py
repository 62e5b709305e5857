"""What each step feature costs the jitted train programs alone, without the Trainer's loop.

A short fit builds the Trainer's programs for a set of step features (what NaNGuard,
GradNormMonitor and friends ask the step for); the programs are then called in a tight loop
with pre-stacked batches, like the hand-written loops of ``overhead.py``, and compared with
the same programs built without features. This isolates device-side cost from the loop's host
work. With a gate (NaNGuard) on a small state the programs run ungated
(``StepConfig.speculate``: the Trainer undoes a bad step from a copy it keeps);
``--no-speculate`` gates every step instead, as for states above ``SPECULATE_MAX_BYTES``.

    .venv/bin/python benchmarks/step_features.py                  # small MLP, spe 1 and 32
    .venv/bin/python benchmarks/step_features.py --hidden 512 --steps 896
    .venv/bin/python benchmarks/step_features.py --no-speculate --spe 32

Prints steps/s and the cost of each feature set against none; exits 0 (no target here).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import DigitsModule, digits, full_batches  # noqa: E402

import nnxfit  # noqa: E402
import nnxfit.speculation  # noqa: E402
from nnxfit.data import ArrayLoader  # noqa: E402
from nnxfit.spikes import SpikeSpec  # noqa: E402
from nnxfit.step import StepFeatures  # noqa: E402

# SpikeGuard's window, with a threshold no step reaches: the cost of the test and the gate with
# every step applied (at 6.0 the MLP, once its loss is near 0, has many steps skipped, which
# then cost less than a step: the rate would flatter the guard).
SPIKE = SpikeSpec("loss", 128, 1e30, halt=False)

SETS = {
    "none": [],
    "grad_norm": ["grad_norm"],
    "finite+grad_norm": ["finite", "grad_norm"],
    "NaNGuard(stop)+GradNormMonitor": ["finite", "halt_on_nonfinite", "grad_norm"],
    "NaNGuard(skip)": ["finite", "skip_nonfinite"],
    # Features with values are asked for as a StepFeatures (EMA, SpikeGuard).
    "EMA(0.999)": StepFeatures(ema_decay=0.999),
    "SpikeGuard(loss)": StepFeatures(spike=SPIKE),
    "NaNGuard(skip)+SpikeGuard": StepFeatures(on_nonfinite="skip", spike=SPIKE),
}


class _Features(nnxfit.Callback):
    def __init__(self, features):
        self.step_features = features if isinstance(features, StepFeatures) else frozenset(features)


def programs(x, y, batch: int, hidden: int, features, spe: int):
    """The Trainer's train programs for ``features`` and a fresh copy of its carry."""
    trainer = nnxfit.Trainer(
        max_steps=2 * spe, progress_bar=False, callbacks=[_Features(features)],
        steps_per_execution=spe,
    )  # fmt: skip
    trainer.fit(DigitsModule(hidden), ArrayLoader((x, y), batch_size=batch))
    return trainer.programs, [jnp.copy(leaf) for leaf in trainer.carry.leaves]


def runner(x, y, batches, batch: int, hidden: int, features, spe: int):
    progs, leaves = programs(x, y, batch, hidden, features, spe)
    stacked = [np.stack([b[i] for b in batches]) for i in range(2)]
    nb, state = len(batches), {"leaves": leaves, "call": 0}

    def run(n: int) -> None:
        carry, c0 = state["leaves"], state["call"]
        for c in range(n // spe):
            if spe == 1:
                carry = progs.train_single(carry, list(batches[(c0 + c) % nb]))
            else:
                rows = np.arange((c0 + c) * spe, (c0 + c + 1) * spe) % nb
                carry = progs.train_multi(carry, [s[rows] for s in stacked])
        jax.block_until_ready(carry)
        state["leaves"], state["call"] = carry, c0 + n // spe

    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=3200, help="steps per timing")
    p.add_argument("--spe", default="1,32", help="steps per call, comma-separated")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sets", default=",".join(SETS), help="feature sets, comma-separated")
    p.add_argument("--no-speculate", action="store_true", help="gate every step (no speculation)")
    args = p.parse_args(argv)
    if args.no_speculate:
        nnxfit.speculation.SPECULATE_MAX_BYTES = 0
    names = ["none", *[s for s in args.sets.split(",") if s != "none"]]

    x, y, batches = full_batches(*digits(), args.batch)
    print(
        f"MLP hidden {args.hidden}, batch {args.batch}, {args.steps} steps per timing, best of "
        f"{args.repeats}; jax {jax.__version__}, {jax.devices()[0].device_kind}; speculate "
        f"{'off' if args.no_speculate else f'up to {nnxfit.speculation.SPECULATE_MAX_BYTES} B'}"
    )
    for spe in (int(s) for s in args.spe.split(",")):
        runs = {n: runner(x, y, batches, args.batch, args.hidden, SETS[n], spe) for n in names}
        for run in runs.values():
            run(2 * spe)  # compile and warm up
        best = dict.fromkeys(runs, 0.0)
        n = max(spe, args.steps // spe * spe)
        for _ in range(args.repeats):
            for name, run in runs.items():  # interleaved: load hits every set alike
                t = time.perf_counter()
                run(n)
                best[name] = max(best[name], n / (time.perf_counter() - t))
        print(f"\nsteps_per_execution={spe}")
        for name, rate in best.items():
            print(f"  {name:34s} {rate:9.1f} steps/s  cost {best['none'] / rate - 1:+7.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
