"""Peak memory of ``Trainer.fit`` against the hand-written donated ``jax.jit`` loop.

Each contender trains the same MLP (hidden 4096 by default: ~17M parameters, so that model,
gradients and AdamW state dwarf the interpreter) for a few steps in its own fresh subprocess,
so peaks never mix. Both children import the same modules and load the same data before
taking their baseline. Measured per child:

* host: peak RSS (``VmHWM``) and the growth over the
  baseline RSS taken just before the model is built ("fit's own" memory); on CPU this is
  also the device memory, since jax's CPU buffers live in host RAM;
* device: ``peak_bytes_in_use`` of ``jax.devices()[0].memory_stats()`` where the backend
  reports it (GPU, TPU; CPU returns None).

Exits 1 when nnxfit's own memory (device peak where reported, else the host growth) exceeds
``--max-ratio`` (default 1.05) times the hand-written loop's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CONTENDERS = ("hand", "nnxfit", "nnxfit+guard")


def child(args) -> dict:
    """Runs one contender in this (fresh) process and returns its measurements."""
    sys.path.insert(0, HERE)
    import jax
    from common import (
        digits,
        full_batches,
        guard_callbacks,
        hand_jit,
        nnxfit_fit_seconds,
        num_params,
        peak_rss_bytes,
        rss_now_bytes,
    )

    import nnxfit.callbacks.csv_logger  # noqa: F401 - same imports for every contender
    import nnxfit.callbacks.progress  # noqa: F401

    x, y = digits()
    x, y, batches = full_batches(x, y, args.batch)
    jax.numpy.ones(8).block_until_ready()  # backend up before the baseline
    base = rss_now_bytes()
    peak_before = peak_rss_bytes()
    if args.child == "hand":
        run = hand_jit(batches, args.hidden)
        run(args.steps)
    else:
        cbs = (lambda: guard_callbacks()[0]) if args.child == "nnxfit+guard" else list
        nnxfit_fit_seconds(
            x, y, batch=args.batch, hidden=args.hidden, steps=args.steps, spe=1, callbacks=cbs
        )
    peak = peak_rss_bytes()
    stats = jax.devices()[0].memory_stats() or {}
    from common import MLP
    from flax import nnx

    return {
        "contender": args.child,
        "params": num_params(MLP(64, args.hidden, 10, rngs=nnx.Rngs(0)))
        if args.count_params
        else None,
        "baseline_rss": base,
        "peak_before_fit": peak_before,
        "peak_rss": peak,
        "own_host": peak - base,
        "device_peak": stats.get("peak_bytes_in_use"),
    }


def run_child(name: str, args) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        name,
        "--hidden",
        str(args.hidden),
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
    ]
    if name == "hand":
        cmd.append("--count-params")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"memory child {name!r} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:8.1f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2, help="lowest peak of this many children")
    p.add_argument("--max-ratio", type=float, default=1.05)
    p.add_argument("--quick", action="store_true", help="hidden 1024, 5 steps, 1 repeat")
    p.add_argument("--json", default=None)
    p.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    p.add_argument("--count-params", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    if args.quick:
        args.hidden, args.steps, args.repeats = 1024, 5, 1

    best: dict[str, dict] = {}
    for _ in range(args.repeats):
        for name in CONTENDERS:  # interleaved, like the other benchmarks
            r = run_child(name, args)
            if name not in best or r["own_host"] < best[name]["own_host"]:
                best[name] = r
    params = best["hand"]["params"]
    print(
        f"MLP hidden {args.hidden} ({params / 1e6:.1f}M params, {params * 4 / 2**20:.0f} MiB "
        f"f32), batch {args.batch}, {args.steps} steps, lowest of {args.repeats} fresh processes"
    )
    print(f"{'contender':14s} {'baseline':>9s} {'peak RSS':>9s} {'own':>9s} {'device':>9s}  MiB")
    for name, r in best.items():
        print(
            f"{name:14s} {mib(r['baseline_rss'])} {mib(r['peak_rss'])} {mib(r['own_host'])} "
            f"{mib(r['device_peak'])}"
        )
    use_device = best["hand"]["device_peak"] is not None
    key = "device_peak" if use_device else "own_host"
    missed = []
    for name in CONTENDERS[1:]:
        ratio = best[name][key] / best["hand"][key]
        total = best[name]["peak_rss"] / best["hand"]["peak_rss"]
        ok = ratio <= args.max_ratio
        print(
            f"{name}: {'device peak' if use_device else 'own host memory'} {ratio:.3f}x of the "
            f"hand-written loop (target <= {args.max_ratio:.2f}x) {'ok' if ok else 'MISSED'}; "
            f"peak RSS {total:.3f}x"
        )
        if not ok:
            missed.append(name)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": best}, f, indent=1)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
