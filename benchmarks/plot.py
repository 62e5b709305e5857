"""Steps/s by contender and workload, from ``peers.py --json``: one panel per workload.

python benchmarks/plot.py peers.json peers.png
"""

from __future__ import annotations

import json
import sys

LABELS = {
    "A": "jax.jit, hand-written (A)",
    "B": "@nnx.jit (Flax guides)",
    "C": "lax.scan of 32, hand-written",
    "D1": "Keras fit spe=1",
    "D32": "Keras fit spe=32",
    "T": "Tunix PeftTrainer",
    "E1": "nnxfit spe=1",
    "E32": "nnxfit spe=32",
    "E1d": "nnxfit spe=1 (fit diff.)",
    "E32d": "nnxfit spe=32 (fit diff.)",
    "F1": "nnxfit spe=1 + all callbacks",
    "F32": "nnxfit spe=32 + all callbacks",
}


def color(key: str) -> str:
    if key in ("A", "B", "C"):
        return "#7f7f7f"
    if key.startswith(("D", "T")):
        return "#d62728" if key.startswith("D") else "#ff7f0e"
    return "#1f77b4"


def plot(results: list[dict], path: str, title: str | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in LABELS if any(k in r["rates"] for r in results)]
    fig, axes = plt.subplots(
        1, len(results), figsize=(4.6 * len(results), 0.42 * len(keys) + 1.6), squeeze=False
    )
    ys = dict(zip(keys, range(len(keys))[::-1], strict=True))  # one row per contender
    for ax, res in zip(axes[0], results, strict=True):
        # A rate that is not a measurement (peers.py says why) keeps its row, empty, marked.
        invalid = res.get("invalid", {})
        rates = {k: v for k, v in res["rates"].items() if k not in invalid}
        base = rates["A"]
        ks = [k for k in keys if k in rates]
        vals = [rates[k] for k in ks]
        # The line on each bar: the range of its rounds (the bar is the best of them).
        rounds = res.get("rounds", {})
        spans = [
            [v - min(rounds.get(k) or [v]) for k, v in zip(ks, vals, strict=True)],
            [0] * len(ks),
        ]
        ax.barh([ys[k] for k in ks], vals, color=[color(k) for k in ks])
        if rounds:
            ax.errorbar(
                vals, [ys[k] for k in ks], xerr=spans, fmt="none", ecolor="black", lw=0.8, capsize=2
            )
        ax.axvline(base, color="black", lw=0.8, ls="--")
        for k, v in zip(ks, vals, strict=True):
            ax.text(v, ys[k], f" {v / base:.2f}x", va="center", fontsize=8)
        for k in keys:
            if k in invalid:
                ax.text(0, ys[k], " not a measurement (see peers.py)", va="center", fontsize=7)
            elif k not in rates:
                ax.text(0, ys[k], " not run", va="center", fontsize=7)
        ax.set_xlim(0, max(vals) * 1.28)
        ax.set_yticks(list(ys.values()))
        ax.set_yticklabels([LABELS[k] for k in ys] if ax is axes[0][0] else [])
        ax.set_xlabel("steps/s (ratio to A)")
        ax.set_title(res["title"], fontsize=9)
    title = title or "Training throughput: same model, optimizer and data; one process"
    if any(r.get("rounds") for r in results):
        n = max(len(v) for r in results for v in r.get("rounds", {}).values())
        title += f"\nbars: best of {n} rounds; lines: down to the slowest round"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__)
        return 2
    with open(argv[0]) as f:
        data = json.load(f)
    machine = data.get("machine", {}).get("start", "")
    plot(data["results"], argv[1], f"Training throughput on {machine.split(';')[0]}")
    print(argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
