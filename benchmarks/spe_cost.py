"""What ``steps_per_execution=K`` costs and buys: compile time, memory and steps/s per K.

For each workload (``workloads.py``) and K in 1, 4, 32 (and ``scan_unroll=True`` where asked),
a fresh process runs a fit with the default callbacks and reports:

* compile: seconds to trace, lower and compile the train program that runs K steps per call
  (``CompileWatch``'s record of it; the persistent compilation cache is off);
* program memory: XLA's own account of that program (``memory_analysis()``: arguments +
  outputs + temporaries - donated buffers), which is device memory on an accelerator;
* peak RSS: the process's peak resident memory minus its RSS after imports and data, before the
  model is built (``memory.py``'s method; on CPU it includes what the compiler itself took);
* steps/s in steady state inside the fit (``common.Stopwatch``, the window method).

Targets (issue 19): compile at K=32 <= 1.5x K=1; program memory and peak RSS at K=32 <= K=1 +
the K-1 extra stacked batches + 5 %.

    python benchmarks/spe_cost.py                      # mlp, cnn, lm; K = 1, 4, 32
    python benchmarks/spe_cost.py --workloads cnn --unroll   # also scan_unroll=True rows
    python benchmarks/spe_cost.py --quick              # shorter fits
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
KS = (1, 4, 32)


def child(args) -> dict:
    """One fit in this (fresh) process; returns the measurements."""
    sys.path.insert(0, HERE)
    import jax
    import numpy as np
    import workloads as W
    from common import Stopwatch, peak_rss_bytes, rss_now_bytes

    from nnxfit.compile_watch import CompileWatch

    w = W.WORKLOADS[args.workload]()
    jax.numpy.ones(8).block_until_ready()  # the backend up before the baseline
    base = rss_now_bytes()
    K, unroll = args.k, (True if args.child_unroll == "true" else int(args.child_unroll))
    steps = w.quick_steps if args.quick else w.steps
    watch, sw = CompileWatch(warn=False), Stopwatch()
    tr, _ = W._fit(
        w, spe=K, callbacks=[watch, sw], max_epochs=1 + -(-steps // w.nb),
        trainer_kwargs={"scan_unroll": unroll},
    )  # fmt: skip
    peak = peak_rss_bytes()
    kind = "single" if K == 1 else "multi"
    rec = next(r for r in watch.records if r.kind == kind)
    # The same program again, for XLA's memory account: jax's caches return the compiled one.
    programs = tr.programs
    prog = programs.train_single if K == 1 else programs.train_multi
    xb, yb = w.x[: w.batch], w.y[: w.batch]
    batch = [xb, yb] if K == 1 else [np.stack([xb] * K), np.stack([yb] * K)]
    mem = prog.lower(tr.carry.leaves, batch).compile().memory_analysis()
    program = None
    if mem is not None:
        program = (
            mem.argument_size_in_bytes
            + mem.output_size_in_bytes
            + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes
        )
    return {
        "workload": w.name,
        "k": K,
        "unroll": args.child_unroll,
        "compile_s": rec.total_s,
        "compile_detail": {"trace": rec.trace_s, "lower": rec.lower_s, "compile": rec.compile_s},
        "program_bytes": program,
        "temp_bytes": None if mem is None else mem.temp_size_in_bytes,
        "peak_rss_growth": peak - base,
        "batch_bytes": int(xb.nbytes + yb.nbytes),
        "steps_per_s": sw.rate,
    }


def run_child(workload: str, k: int, unroll: str, quick: bool) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", workload, "--k", str(k)]
    cmd += ["--child-unroll", unroll] + (["--quick"] if quick else [])
    env = dict(os.environ, KERAS_BACKEND="jax")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # compile times are what is measured
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"spe_cost child {workload} K={k} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(workloads: list[str], unroll: bool, quick: bool, repeats: int = 1) -> list[dict]:
    """Every (workload, K, unroll) in fresh processes; the fastest compile and the highest
    steps/s of ``repeats`` runs, the lowest memory."""
    rows = []
    for name in workloads:
        variants = [(k, "1") for k in KS]
        if unroll:
            variants += [(k, "true") for k in KS if k > 1]
        for k, u in variants:
            runs = [run_child(name, k, u, quick) for _ in range(repeats)]
            best = dict(runs[0])
            best["compile_s"] = min(r["compile_s"] for r in runs)
            best["steps_per_s"] = max(r["steps_per_s"] for r in runs)
            best["peak_rss_growth"] = min(r["peak_rss_growth"] for r in runs)
            rows.append(best)
            print(format_row(best), flush=True)
    return rows


def mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def format_row(r: dict) -> str:
    u = "" if r["unroll"] == "1" else ", unrolled"
    return (
        f"   {r['workload']:4s} K={r['k']:<3d}{u:10s} compile {r['compile_s']:6.2f} s  program "
        f"{mib(r['program_bytes']):>7s} MiB  peak RSS +{mib(r['peak_rss_growth']):>7s} MiB  "
        f"{r['steps_per_s']:9.1f} steps/s"
    )


def check(rows: list[dict]) -> list[str]:
    """The issue's targets on the scanned programs: a line per miss."""
    missed = []
    by = {(r["workload"], r["k"], r["unroll"]): r for r in rows}
    for name in dict.fromkeys(r["workload"] for r in rows):
        one, big = by.get((name, 1, "1")), by.get((name, 32, "1"))
        if one is None or big is None:
            continue
        ratio = big["compile_s"] / one["compile_s"]
        if ratio > 1.5:
            missed.append(f"{name}: compile at K=32 is {ratio:.2f}x K=1 (target <= 1.5x)")
        extra = 31 * one["batch_bytes"]
        for key in ("program_bytes", "peak_rss_growth"):
            if one[key] is None:
                continue
            limit = (one[key] + extra) * 1.05
            if big[key] > limit:
                missed.append(
                    f"{name}: {key} at K=32 {mib(big[key])} MiB > K=1 {mib(one[key])} MiB + "
                    f"stacked batches {mib(extra)} MiB + 5 %"
                )
    return missed


def markdown(rows: list[dict]) -> str:
    out = [
        "| workload | K | compile (s) | program memory (MiB) | peak RSS growth (MiB) | steps/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        k = f"{r['k']}" + ("" if r["unroll"] == "1" else ", `scan_unroll=True`")
        out.append(
            f"| {r['workload']} | {k} | {r['compile_s']:.2f} | {mib(r['program_bytes'])} | "
            f"{mib(r['peak_rss_growth'])} | {r['steps_per_s']:.1f} |"
        )
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default="mlp,cnn,lm")
    p.add_argument("--unroll", action="store_true", help="also K=4, 32 with scan_unroll=True")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=1, help="fresh processes per row")
    p.add_argument("--json", default=None)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--k", type=int, help=argparse.SUPPRESS)
    p.add_argument("--child-unroll", default="1", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.workload = args.child
        print(json.dumps(child(args)))
        return 0
    rows = measure(args.workloads.split(","), args.unroll, args.quick, args.repeats)
    print(markdown(rows))
    missed = check(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "missed": missed}, f, indent=1)
    for m in missed:
        print("MISSED " + m)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
