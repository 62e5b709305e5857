"""The ``nnxfit`` command (also ``python -m nnxfit``). Subcommands:

* ``nnxfit plot WORKDIR [--out DIR]``: PNG training curves from ``WORKDIR/metrics.csv``
  (see ``nnxfit.plot``), and ``runs.png`` with every run of a workdir that holds versions;
  prints the paths written.
* ``nnxfit plot --compare DIR1 DIR2 ... [--out FILE]``: several runs on one figure
  (``compare.png`` in the current folder unless ``--out`` names a ``.png`` or a folder).

A new subcommand is a function ``_add_<name>(subparsers)`` that registers its parser and sets
``func``: a callable taking the parsed arguments and returning the exit status. Exit status 2
means bad input (argparse's convention), with the reason on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (0 on success, 2 on bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return args.func(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnxfit", description="nnxfit: tools for the runs a Trainer wrote."
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_plot(sub)
    return parser


def _add_plot(sub) -> None:
    p = sub.add_parser(
        "plot",
        help="write PNG training curves from a run's metrics.csv",
        description="Write PNG training curves (loss and every metric vs step, train and val_ "
        "on the same axes) from WORKDIR/metrics.csv into WORKDIR/plots/: one PNG per metric "
        "and overview.png (and runs.png: every run of a WORKDIR that holds version_N "
        "folders). With --compare, several runs on one figure.",
    )
    p.add_argument(
        "workdir", metavar="WORKDIR", nargs="?", help="the run folder (Trainer(workdir=...))"
    )
    p.add_argument(
        "--compare",
        metavar="DIR",
        nargs="+",
        default=None,
        help="draw these runs (and WORKDIR, if given) on one figure, a panel per metric and a "
        "colour per run; a workdir with version_N folders counts as all its runs",
    )
    p.add_argument(
        "--out",
        metavar="PATH",
        default=None,
        help="output folder (default WORKDIR/plots); with --compare a .png file or a folder "
        "(default ./compare.png)",
    )
    p.set_defaults(func=_plot, parser=p)


def _plot(args: argparse.Namespace) -> int:
    from nnxfit.plot import PlotError, plot_compare, plot_run

    try:
        if args.compare:
            paths = [
                plot_compare(([args.workdir] if args.workdir else []) + args.compare, args.out)
            ]
        elif args.workdir is None:  # argparse's own error: usage on stderr, exit 2
            args.parser.error(
                "the following arguments are required: WORKDIR (or --compare DIR1 DIR2 ...)"
            )
        else:
            paths = plot_run(args.workdir, args.out)
    except PlotError as e:
        print(f"nnxfit plot: error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0
