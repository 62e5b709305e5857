"""``ModelSummary`` and ``summarize``: a rich table of a module's variables by submodule.

Each row is a submodule (or a variable) down to ``max_depth``: how many elements it holds
that the optimizer trains and how many it does not, the shapes (when few), dtypes and bytes;
when any array is spread over several devices, also the bytes one device holds and the
sharding. The last rows split the whole module into trainable params (the module's
``trainable`` filter), frozen params (``nnx.Param`` outside that filter) and other state
(BatchNorm statistics, RNG keys and counters, ...).

Works on concrete modules and on abstract ones from ``nnx.eval_shape`` (nothing is
allocated to summarize a model too big for the host).

``ModelSummary`` prints the table whole when the output is not a terminal (a pipe, a file, a
CI log): such a console says it is 80 columns wide, which would cut names and wrap numbers,
and nothing there limits a line's length. On a terminal the table fits the terminal's width.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass

import jax
import numpy as np
from flax import nnx
from rich import box, get_console
from rich.console import Console
from rich.table import Table

from nnxfit.callbacks.base import Callback
from nnxfit.errors import ConfigError

TRAINABLE, FROZEN, OTHER = "trainable", "frozen", "other"
MAX_SHAPES = 4  # a row lists its arrays' shapes when it has at most this many


@dataclass(frozen=True)
class VariableInfo:
    """One variable of the module, as the summary counts it."""

    path: tuple
    type_name: str  # the Variable class: Param, BatchStat, RngKey, ...
    kind: str  # TRAINABLE, FROZEN or OTHER
    shape: tuple
    dtype: str
    size: int  # elements
    nbytes: int
    device_bytes: int  # bytes of one device's shard (== nbytes unless sharded)
    sharding: str | None  # None on a single device


def variable_infos(module: nnx.Module) -> list[VariableInfo]:
    """Every variable of ``module`` (shared ones once), in path order."""
    trainable = nnx.filterlib.to_predicate(getattr(module, "trainable", nnx.Param))
    out = []
    for path, var in nnx.to_flat_state(nnx.state(module)):
        if not isinstance(var, nnx.Variable):
            continue
        if trainable(path, var):
            kind = TRAINABLE
        elif isinstance(var, nnx.Param):
            kind = FROZEN
        else:
            kind = OTHER
        info = _array_info(var.get_raw_value())
        if info is not None:
            out.append(VariableInfo(tuple(path), type(var).__name__, kind, *info))
    return out


def _array_info(x) -> tuple | None:
    """(shape, dtype, size, nbytes, device_bytes, sharding) of an array-like, else None."""
    if isinstance(x, jax.Array | jax.ShapeDtypeStruct):
        shape, dtype = tuple(x.shape), x.dtype
    else:
        try:
            a = np.asarray(x)
        except Exception:  # noqa: BLE001 - not an array: nothing to count
            return None
        if a.dtype == object:
            return None
        shape, dtype = a.shape, a.dtype
    size = math.prod(shape)
    try:
        itemsize = x.nbytes // size if isinstance(x, jax.Array) and size else dtype.itemsize
    except Exception:  # noqa: BLE001 - extended dtypes (abstract PRNG keys) may have none
        itemsize = 0
    nbytes = size * itemsize
    device_bytes, sharding = nbytes, None
    s = getattr(x, "sharding", None)
    if s is not None and len(s.device_set) > 1:
        device_bytes = math.prod(s.shard_shape(shape)) * itemsize
        sharding = _describe_sharding(s)
    return shape, str(dtype), size, nbytes, device_bytes, sharding


def _describe_sharding(s) -> str:
    if s.is_fully_replicated:
        return f"replicated x{len(s.device_set)}"
    spec = getattr(s, "spec", None)
    if spec is not None:
        return "(" + ", ".join(repr(p) if p is not None else "None" for p in spec) + ")"
    return type(s).__name__


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


def format_shape(s: tuple) -> str:
    """``8x16``; ``16`` for a vector, ``()`` for a scalar: no spaces, so lists wrap cleanly."""
    return "x".join(map(str, s)) if s else "()"


def _node_at(root, path: tuple):
    node = root
    for key in path:
        try:
            if isinstance(key, str) and not isinstance(node, Mapping):
                node = getattr(node, key)
            else:
                node = node[key]
        except Exception:  # noqa: BLE001 - a path nnx knows but attributes do not show
            return None
    return node


def summarize(module: nnx.Module, max_depth: int = 1) -> Table:
    """A rich ``Table`` of ``module``'s variables grouped by submodule down to ``max_depth``
    (``-1``: every level, down to single variables). Print it with ``rich.print``."""
    if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < -1:
        raise ConfigError(
            f"max_depth must be an integer >= 0, or -1 for every level; got {max_depth!r}."
        )
    infos = variable_infos(module)
    depth = max(len(i.path) for i in infos) if max_depth == -1 and infos else max_depth
    sharded = any(i.sharding is not None for i in infos)

    table = Table(
        title=f"{type(module).__name__} summary",
        title_justify="left",
        box=box.SIMPLE_HEAD,  # light lines: fits 80 columns with every number whole
        show_edge=False,
    )
    # Numbers never wrap or shorten; shapes and type lists wrap when the console is narrow.
    table.add_column("Name", no_wrap=True)
    table.add_column("Type", max_width=16)
    table.add_column("Trainable", justify="right", no_wrap=True)
    table.add_column("Non-trainable", justify="right", no_wrap=True)
    table.add_column("Shapes", max_width=28)
    table.add_column("Dtype")
    table.add_column("Bytes", justify="right", no_wrap=True)
    if sharded:
        table.add_column("Per device", justify="right", no_wrap=True)
        table.add_column("Sharding", no_wrap=True)

    groups: dict[tuple, list[VariableInfo]] = {}
    for info in infos:  # in path order, so a module comes before its children
        for d in range(1, min(depth, len(info.path)) + 1):
            groups.setdefault(info.path[:d], []).append(info)
    for path, members in groups.items():
        if members[0].path == path:  # the row is a single variable
            type_name = members[0].type_name
        else:
            node = _node_at(module, path)
            type_name = type(node).__name__ if node is not None else ""
        table.add_row(".".join(map(str, path)), type_name, *_cells(members, sharded))

    table.add_section()
    for kind, label in ((TRAINABLE, "trainable"), (FROZEN, "frozen"), (OTHER, "other state")):
        members = [i for i in infos if i.kind == kind]
        types = ", ".join(dict.fromkeys(i.type_name for i in members))
        n = f"{sum(i.size for i in members):,}"
        row = [label, types, n, ""] if kind == TRAINABLE else [label, types, "", n]
        row += ["", _dtypes(members), format_bytes(sum(i.nbytes for i in members))]
        if sharded:
            row += [format_bytes(sum(i.device_bytes for i in members)), ""]
        table.add_row(*row)
    table.add_row("total", "", *_cells(infos, sharded, shapes=False), style="bold")
    return table


def short_dtype(name: str) -> str:
    """float32 -> f32, bfloat16 -> bf16, uint8 -> u8, key<fry> -> key: tables stay narrow."""
    if name.startswith("key<"):
        return "key"
    for long, short in (("bfloat", "bf"), ("float", "f"), ("uint", "u"), ("int", "i")):
        if name.startswith(long) and name[len(long) :].isdigit():
            return short + name[len(long) :]
    return name


def _dtypes(members: list[VariableInfo]) -> str:
    return ", ".join(dict.fromkeys(short_dtype(i.dtype) for i in members))


def _cells(members: list[VariableInfo], sharded: bool, shapes: bool = True) -> list[str]:
    trainable = sum(i.size for i in members if i.kind == TRAINABLE)
    other = sum(i.size for i in members if i.kind != TRAINABLE)
    if not shapes:
        shape = ""
    elif len(members) <= MAX_SHAPES:
        shape = ", ".join(format_shape(i.shape) for i in members)
    else:
        shape = f"{len(members)} arrays"
    cells = [f"{trainable:,}", f"{other:,}", shape, _dtypes(members) if shapes else ""]
    cells.append(format_bytes(sum(i.nbytes for i in members)))
    if sharded:
        cells.append(format_bytes(sum(i.device_bytes for i in members)))
        specs = {i.sharding or "single device" for i in members}
        cells.append(specs.pop() if len(specs) == 1 else "mixed")
    return cells


def print_table(console: Console, table: Table) -> None:
    """Prints ``table`` on ``console``: to the terminal's width on a terminal (or in Jupyter),
    else whole, at its natural width, as plain text."""
    if console.is_terminal or console.is_jupyter:
        console.print(table)
        return
    width = console.measure(table, options=console.options.update_width(10_000)).maximum
    if width <= console.width:
        console.print(table)
        return
    # Console.print never renders wider than the console: render apart, print as is.
    wide = Console(file=io.StringIO(), width=width, color_system=None, highlight=False)
    wide.print(table)
    console.print(wide.file.getvalue().rstrip("\n"), markup=False, highlight=False, soft_wrap=True)


class ModelSummary(Callback):
    """Prints ``summarize(module, max_depth)`` when ``fit`` starts (process 0 only).

    The table shows the module as the fit holds it: after placement on the Trainer's mesh,
    so the per-device bytes and sharding are the ones training uses.
    """

    order = -100  # early: before anything else prints at fit start

    def __init__(self, max_depth: int = 1, console: Console | None = None):
        if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < -1:
            raise ConfigError(
                f"ModelSummary max_depth must be an integer >= 0, or -1 for every level; got "
                f"{max_depth!r}."
            )
        self.max_depth = max_depth
        self.console = console

    def on_fit_start(self, trainer, module) -> None:
        if not trainer.is_global_zero:
            return
        console = self.console or getattr(trainer, "console", None) or get_console()
        print_table(console, summarize(module, self.max_depth))

    def __repr__(self) -> str:
        return f"ModelSummary(max_depth={self.max_depth})"
