"""How much asynchronous checkpointing slows training down.

Steps/s of ``Trainer.fit`` on a ~10M-parameter MLP (digits, hidden 3136, batch 64, AdamW: ~115
MiB of params and optimizer state per checkpoint) while ``ModelCheckpoint(every_n_steps=N)``
writes orbax checkpoints in the background, against the same fit without checkpoints. Both
are timed in steady state inside the fit (first epoch excluded, as in ``overhead.py``), best
of ``--repeats``, interleaved. Exits 1 when the ratio is below ``--min-ratio`` (0.90).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import MLP, digits, full_batches, nnxfit_steady_rate, num_params  # noqa: E402
from flax import nnx  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=3136)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=280, help="timed steps (whole epochs of 28)")
    p.add_argument("--every", type=int, default=100, help="checkpoint every this many steps")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--min-ratio", type=float, default=0.90)
    p.add_argument("--quick", action="store_true", help="hidden 512, 56 steps, every 20, 1 repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.steps, args.every, args.repeats = 512, 56, 20, 1

    try:
        from nnxfit.callbacks.checkpoint import ModelCheckpoint
    except ImportError:
        print("nnxfit.callbacks.checkpoint.ModelCheckpoint does not exist yet; nothing to measure")
        return 2

    x, y = digits()
    x, y, _ = full_batches(x, y, args.batch)
    n = num_params(MLP(64, args.hidden, 10, rngs=nnx.Rngs(0)))
    print(
        f"MLP hidden {args.hidden}: {n / 1e6:.1f}M params ({n * 12 / 2**20:.0f} MiB with AdamW "
        f"state), batch {args.batch}, {args.steps} timed steps, checkpoint every {args.every} "
        f"steps, best of {args.repeats}",
        flush=True,
    )
    saves = []

    class Counted(ModelCheckpoint):
        """Counts the saves it starts, to show the timed fits did write checkpoints."""

        def _save(self, trainer, metrics):
            started = super()._save(trainer, metrics)
            if started:
                saves.append(trainer.global_step)
            return started

    def with_ckpt():
        saves.clear()
        return [Counted(every_n_steps=args.every, save_top_k=1)]

    contenders = {"no checkpoints": list, f"every {args.every} steps": with_ckpt}
    best = dict.fromkeys(contenders, 0.0)
    in_window = 0
    for _ in range(args.repeats):
        for name, cbs in contenders.items():
            r, s0, s1, _ = nnxfit_steady_rate(
                x,
                y,
                batch=args.batch,
                hidden=args.hidden,
                steps=args.steps,
                spe=1,
                callbacks=cbs,
                window=True,
            )
            best[name] = max(best[name], r)
            note = ""
            if cbs is with_ckpt:
                in_window = sum(s0 < s < s1 for s in saves)  # s1: the end-of-fit save
                note = f"  (saved at steps {saves}, {in_window} in the timed steps {s0}-{s1})"
            print(f"  {name:20s} {r:8.2f} steps/s{note}", flush=True)
    with_rate, without = best[f"every {args.every} steps"], best["no checkpoints"]
    ratio = with_rate / without
    ok = ratio >= args.min_ratio
    for name, r in best.items():
        print(f"{name:20s} {r:8.2f} steps/s (best)")
    if in_window:
        # Seconds of training lost per save: what any other N would cost, roughly.
        lost = (s1 - s0) * (1 / with_rate - 1 / without) / in_window
        print(
            f"each save costs ~{lost:.2f} s of training time; every N steps that is a ratio of "
            f"~1 / (1 + {lost:.2f} * {without:.1f} / N), e.g. N={args.every}: "
            f"{1 / (1 + lost * without / args.every):.2f}"
        )
    print(
        f"with checkpoints: {ratio:.3f}x of without (target >= {args.min_ratio:.2f}x) "
        f"{'ok' if ok else 'MISSED'}"
    )
    print("shared machine: numbers are noisy; compare ratios within one run.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
