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

It returns the paths written, families first (in the CSV's column order), overview last;
when the workdir holds earlier runs (``version_N/``, see ``nnxfit.runs``), ``runs.png``
after them: every run of the workdir on one figure (``plot_compare``).

``plot_compare(paths, out)`` (``nnxfit plot --compare DIR1 DIR2 ... [--out FILE]``) draws
several runs on one figure: a panel per metric (``loss``, ``val_loss``, ``accuracy``, ...,
in the order the runs logged them), a colour per run. A train metric is drawn per epoch
(solid, markers) over its per-log-interval values (thin, faint); a ``val_`` metric per epoch.
Each path is a run folder or its ``metrics.csv``; a workdir with versions counts as all of
its runs (``version_0``, ``version_1``, ..., then the newest at the top). Runs are labelled
by their folder, relative to the folders' common parent (a workdir's newest run as
``<workdir> (latest)``), followed by the hyperparameters that differ between them
(``hparams.yaml``: ``lr=0.01``).

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
RUNS = "runs"  # the workdir's runs (its versions) on one figure
COMPARE = "compare.png"  # plot_compare's default file name
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
    if csv_path.parent != Path(workdir) or not _versions(csv_path.parent):
        return written
    written.append(plot_compare([csv_path.parent], out / f"{RUNS}.png"))
    return written


# ------------------------------------------------------------------------ several runs ---
@dataclass
class Run:
    label: str
    csv_path: Path
    hparams: dict = field(default_factory=dict)


def find_runs(paths: list[str | os.PathLike]) -> list[Run]:
    """The runs behind ``paths`` (see the module docstring), labelled."""
    found: list[tuple[Path, bool]] = []  # (run folder or csv, is a workdir's newest)
    for p in map(Path, paths):
        versions = _versions(p) if p.is_dir() else []
        found += [(v, False) for v in versions]
        if versions and not (p / METRICS_FILE).is_file():
            continue
        found.append((p, bool(versions)))
    if not found:
        raise PlotError("nnxfit plot --compare needs at least one run folder.")
    csvs = [_find_csv(p) for p, _ in found]
    folders = [c.parent.resolve() for c in csvs]
    root = Path(os.path.commonpath(folders)) if len(folders) > 1 else folders[0].parent
    from nnxfit.hparams import read_file

    runs = []
    for (_, latest), csv_path, folder in zip(found, csvs, folders, strict=True):
        rel = os.path.relpath(folder, root)
        label = folder.name if rel == "." else rel
        if latest:
            label += " (latest)"
        runs.append(Run(label, csv_path, read_file(folder)))
    _add_hparams_to_labels(runs)
    seen: dict[str, int] = {}
    for r in runs:  # the same folder given twice
        seen[r.label] = seen.get(r.label, 0) + 1
        if seen[r.label] > 1:
            r.label = f"{r.label} #{seen[r.label]}"
    return runs


def plot_compare(paths: list[str | os.PathLike], out: str | os.PathLike | None = None) -> Path:
    """Draws the runs of ``paths`` on one figure (see the module docstring); writes it to
    ``out`` (a ``.png`` path, or a folder for ``compare.png``; default ``./compare.png``) and
    returns its path."""
    runs = find_runs(paths)
    curves = [read_curves(r.csv_path) for r in runs]
    names: list[str] = []
    for c in curves:
        names += [n for n in c if n not in names]
    names = _panel_order(names)
    out = Path(out) if out is not None else Path.cwd() / COMPARE
    if out.suffix.lower() != ".png":
        out = out / COMPARE
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PlotError(
            f"cannot create the folder of {str(out)!r}: {e.strerror or e}. Pass a writable "
            "--out path."
        ) from e

    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    ncols = 2 if len(names) in (2, 4) else min(3, len(names))  # a train/val pair per row
    nrows = math.ceil(len(names) / ncols)
    fig = Figure(figsize=(5.5 * ncols, 3.6 * nrows + 0.6), layout="constrained")
    for i, name in enumerate(names):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        values = []
        for j, c in enumerate(curves):
            color = f"C{j % 10}"
            interval, epoch = c.get(name, ((), ()))
            if interval:
                ax.plot(*zip(*interval, strict=True), color=color, lw=0.8, alpha=0.35)
            if epoch:
                ax.plot(*zip(*epoch, strict=True), color=color, lw=1.6, marker="o", ms=3)
            values += [v for _, v in (*interval, *epoch)]
        if "loss" in name and values and min(values) > 0 and max(values) / min(values) >= 100:
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    handles = [Line2D([], [], color=f"C{j % 10}", lw=2, marker="o") for j in range(len(runs))]
    fig.legend(
        handles,
        [r.label for r in runs],
        loc="outside lower center",
        ncols=min(4, len(runs)),
        fontsize="small",
    )
    fig.suptitle(f"{len(runs)} runs: per epoch (markers) and per log interval (faint)")
    fig.savefig(out, dpi=100)
    return out


def read_curves(csv_path: Path) -> dict[str, tuple[list, list]]:
    """``{metric: (interval points, epoch points)}`` of a ``metrics.csv``; points are
    ``(step, value)``, finite values only."""
    families = read_families(csv_path)  # checks the file as plot_run does
    del families
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    out: dict[str, tuple[list, list]] = {}
    for name in (c for c in rows[0] if c not in _NOT_METRICS and c is not None):
        interval, epoch = [], []
        for r in rows:
            step, value = _number(r.get("step")), _number(r.get(name))
            if step is None or value is None:
                continue
            kind = r.get("kind", "train")
            if kind == "train":
                interval.append((int(step), value))
            elif kind == "epoch":
                epoch.append((int(step), value))
        if interval or epoch:
            out[name] = (interval, epoch)
    return out


def _panel_order(names: list[str]) -> list[str]:
    """Each train metric followed by its ``val_`` twin, loss first."""
    base = [n for n in names if not n.startswith("val_")]
    base.sort(key=lambda n: n != "loss")
    ordered = []
    for n in base:
        ordered.append(n)
        if f"val_{n}" in names:
            ordered.append(f"val_{n}")
    return ordered + [n for n in names if n not in ordered]


def _versions(folder: Path) -> list[Path]:
    found = []
    if folder.is_dir():
        for p in folder.iterdir():
            m = re.match(r"^version_(\d+)$", p.name)
            if m and p.is_dir() and (p / METRICS_FILE).is_file():
                found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def _add_hparams_to_labels(runs: list[Run], most: int = 3) -> None:
    keys: list[str] = []
    for r in runs:
        keys += [k for k in r.hparams if k not in keys]
    differ = [k for k in keys if len({repr(r.hparams.get(k)) for r in runs}) > 1][:most]
    for r in runs:
        shown = [f"{k}={r.hparams[k]}" for k in differ if k in r.hparams]
        if shown:
            r.label = f"{r.label} ({', '.join(shown)})"


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
