"""Where nnxfit's one-step-per-call fit loses to the hand-written loop: host CPU per step.

For each workload, the hand-written donated ``jax.jit`` loop (A) and nnxfit at
``steps_per_execution=1`` (E1, the window inside one fit, as ``peers.py`` times it) are run
alternately; each reports wall time per step, CPU time per step of the thread that runs the
loop (Python and dispatch: the host's share), and CPU time per step of the whole process (the
loop plus XLA's threads computing the step). On a machine with 2 cores the step's computation
and the loop's thread share them, so host CPU the loop adds slows the device too.

    python benchmarks/host_cost.py [--workloads mlp,cnn] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")

import workloads as W  # noqa: E402
from common import Stopwatch  # noqa: E402
from peers import machine  # noqa: E402


def hand(w, n: int) -> tuple[float, float, float]:
    run = W.hand_jit(w)
    run(w.nb)  # compiles
    t, loop, cpu = time.perf_counter(), time.thread_time(), time.process_time()
    run(n)
    dt = [time.perf_counter() - t, time.thread_time() - loop, time.process_time() - cpu]
    return tuple(v / n * 1e6 for v in dt)


def nnxfit(w, n: int) -> tuple[float, float, float]:
    sw = Stopwatch()
    W._fit(w, spe=1, callbacks=[sw], max_epochs=1 + -(-n // w.nb))
    steps = sw.s1 - sw.s0
    return (sw.t1 - sw.t0) / steps * 1e6, sw.loop_cpu_per_step(), sw.cpu_per_step()[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default="mlp,cnn")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    print(f"machine: {machine()}", flush=True)
    for name in args.workloads.split(","):
        w = getattr(W, name)()
        n = w.steps
        best = {"A": None, "E1": None}
        for _ in range(args.repeats):
            for key, f in (("A", hand), ("E1", nnxfit)):
                r = f(w, n)
                if best[key] is None or r[0] < best[key][0]:
                    best[key] = r
        print(f"\n== {name}: {w.title}; N={n} steps; best of {args.repeats} by wall time")
        print(f"   {'':4s} {'wall us/step':>13s} {'loop thread CPU':>16s} {'process CPU':>12s}")
        for key, (wall, loop, cpu) in best.items():
            print(f"   {key:4s} {wall:13.1f} {loop:16.1f} {cpu:12.1f}")
        (aw, al, ac), (ew, el, ec) = best["A"], best["E1"]
        print(
            f"   E1 - A: wall {ew - aw:+.1f} us/step ({aw / ew:.3f}x of A's rate); loop thread "
            f"{el - al:+.1f} us/step; process {ec - ac:+.1f} us/step",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
