"""Training curves as PNG files, drawn from a run's ``metrics.csv`` (``nnxfit plot WORKDIR``).

``plot_run(workdir)`` reads ``WORKDIR/metrics.csv`` (written by ``CSVLogger``) and writes,
into ``WORKDIR/plots/`` (or ``out_dir``):

* ``<family>.png`` per metric family: a train metric and its ``val_`` twin share one set of
  axes (``loss`` with ``val_loss``, ``accuracy`` with ``val_accuracy``), and names with a
  ``/`` join the family of their prefix (``grad_norm`` with ``grad_norm/encoder``). Each
  train metric is drawn twice: thin, per log interval (the CSV's ``train`` rows) and with
  markers, per epoch (its ``epoch`` rows); ``val_`` metrics come from the epoch rows. Most
  train metrics are means over the interval or the epoch; those the Trainer logs as the value
  at a step (``lr``, ``lr/<name>``, and the running counts ``nonfinite_steps`` and
  ``spike_steps``) are labelled "at each log step" and "at epoch end" instead.
  The x axis is the optimizer step. A loss family that stays positive and spans two decades
  or more gets a log scale. Characters other than letters, digits, ``_ . -`` in a family
  name become ``_`` in the file name.
* ``overview.png``: every family in one grid.

It returns the paths written, families first (in the CSV's column order), overview last.
Only matplotlib's Agg canvas is used, so no display is ever needed. Bad input raises
``PlotError`` naming the path and the fix; the command line turns it into exit status 2.
"""

from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from nnxfit.errors import NnxfitError

METRICS_FILE = "metrics.csv"
PLOTS_DIR = "plots"
OVERVIEW = "overview"
_NOT_METRICS = {"step", "epoch", "kind"}
# Logged as their value at the interval's or epoch's last step, not as a mean over its steps.
AT_STEP = {"lr", "nonfinite_steps", "spike_steps"}


def is_at_step(name: str) -> bool:
    """Whether ``name`` is logged as its value at a step (``lr``), not a mean over steps."""
    return name in AT_STEP or name.startswith("lr/")


class PlotError(NnxfitError, ValueError):
    """The run folder or its ``metrics.csv`` cannot be plotted (missing, empty, not ours)."""


@dataclass
class Series:
    label: str
    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    style: str = "epoch"  # "interval" (thin line), "epoch" (markers), "val" (dashed, markers)
    base: str = ""


def plot_run(workdir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Writes ``<family>.png`` per metric family and ``overview.png``; returns their paths.

    ``workdir`` is a run folder holding ``metrics.csv`` (a path to the CSV itself works too).
    ``out_dir`` defaults to ``workdir/plots``.
    """
    csv_path = _find_csv(Path(workdir))
    families = read_families(csv_path)
    out = Path(out_dir) if out_dir is not None else csv_path.parent / PLOTS_DIR
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PlotError(
            f"cannot create the plot folder {str(out)!r}: {e.strerror or e}. Pass a writable "
            "output folder (--out DIR)."
        ) from e

    from matplotlib.figure import Figure  # Agg canvas, no pyplot: never needs a display

    written = []
    used: set[str] = {OVERVIEW}
    for name, series in families.items():
        fig = Figure(figsize=(7, 4.5), layout="constrained")
        _draw(fig.add_subplot(), name, series)
        path = out / f"{_file_stem(name, used)}.png"
        fig.savefig(path, dpi=100)
        written.append(path)

    ncols = min(3, len(families))
    nrows = math.ceil(len(families) / ncols)
    fig = Figure(figsize=(5.5 * ncols, 3.8 * nrows), layout="constrained")
    for i, (name, series) in enumerate(families.items()):
        _draw(fig.add_subplot(nrows, ncols, i + 1), name, series)
    fig.suptitle(f"{csv_path.parent.name or csv_path.parent.resolve().name}: training curves")
    path = out / f"{OVERVIEW}.png"
    fig.savefig(path, dpi=100)
    written.append(path)
    return written


def read_families(csv_path: str | os.PathLike) -> dict[str, list[Series]]:
    """The curves of ``metrics.csv`` grouped by family (see the module docstring)."""
    csv_path = Path(csv_path)
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise PlotError(
            f"{str(csv_path)!r} has no rows: the run logged nothing yet. Train for at least "
            "one epoch (or one log interval, log_every_n_steps) and run the command again."
        )
    if "step" not in rows[0]:
        raise PlotError(
            f"{str(csv_path)!r} has no 'step' column (columns: {list(rows[0])}); it was not "
            "written by nnxfit's CSVLogger. Pass the workdir of an nnxfit run."
        )
    metrics = [c for c in rows[0] if c not in _NOT_METRICS and c is not None]
    families: dict[str, list[Series]] = {}
    for name in metrics:
        base = name[4:] if name.startswith("val_") else name
        family = base.split("/")[0]
        if name.startswith("val_"):
            candidates = [Series(name, style="val", base=base)]
        elif is_at_step(name):
            candidates = [
                Series(f"{name} (at each log step)", style="interval", base=base),
                Series(f"{name} (at epoch end)", style="epoch", base=base),
            ]
        else:
            candidates = [
                Series(f"{name} (train, per log interval)", style="interval", base=base),
                Series(f"{name} (train, epoch mean)", style="epoch", base=base),
            ]
        for s in candidates:
            kind = {"interval": "train", "epoch": "epoch", "val": "epoch"}[s.style]
            for r in rows:
                if r.get("kind", "train") != kind:
                    continue
                step, value = _number(r.get("step")), _number(r.get(name))
                if step is not None and value is not None:
                    s.steps.append(int(step))
                    s.values.append(value)
            if s.steps:
                families.setdefault(family, []).append(s)
    if not families:
        raise PlotError(
            f"{str(csv_path)!r} has rows but no finite metric values (columns: "
            f"{list(rows[0])}); check the run's loss for NaN, then train again."
        )
    # Loss first: it is what a person looks at first.
    if "loss" in families:
        families = {"loss": families.pop("loss"), **families}
    return families


def _find_csv(workdir: Path) -> Path:
    if workdir.is_file() and workdir.suffix == ".csv":
        return workdir
    if not workdir.exists():
        raise PlotError(
            f"workdir {str(workdir)!r} does not exist. Pass the folder given as "
            "Trainer(workdir=...) of a run that has started."
        )
    if not workdir.is_dir():
        raise PlotError(
            f"{str(workdir)!r} is a file, not a run folder. Pass the folder given as "
            "Trainer(workdir=...), or the path of its metrics.csv."
        )
    path = workdir / METRICS_FILE
    if not path.is_file():
        raise PlotError(
            f"no {METRICS_FILE} in {str(workdir)!r}. nnxfit writes it (CSVLogger) when the "
            "Trainer has a workdir: train with Trainer(workdir=...), then plot that folder."
        )
    return path


def _number(cell: str | None) -> float | None:
    if cell is None or cell == "":
        return None
    try:
        x = float(cell)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def _draw(ax, family: str, series: list[Series]) -> None:
    bases = list(dict.fromkeys(s.base for s in series))
    single = len(bases) == 1
    for s in series:
        # One metric: train blue, validation orange. Several: a colour per metric.
        color = ("C1" if s.style == "val" else "C0") if single else f"C{bases.index(s.base) % 10}"
        if s.style == "interval":
            ax.plot(s.steps, s.values, color=color, lw=1, alpha=0.45, label=s.label)
        elif s.style == "epoch":
            ax.plot(s.steps, s.values, color=color, lw=1.6, marker="o", ms=4, label=s.label)
        else:
            ax.plot(
                s.steps, s.values, color=color, lw=1.6, ls="--", marker="s", ms=4, label=s.label
            )
    values = [v for s in series for v in s.values]
    if "loss" in family and values and min(values) > 0 and max(values) / min(values) >= 100:
        ax.set_yscale("log")
    ax.set_title(family)
    ax.set_xlabel("step")
    ax.set_ylabel(family)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


def _file_stem(family: str, used: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", family).strip(".") or "metric"
    base, n = stem, 2
    while stem in used:  # two families that sanitise alike, or a metric named "overview"
        stem = f"{base}_{n}"
        n += 1
    used.add(stem)
    return stem
