"""Recompilation guard and persistent compilation cache.

``CompileWatch`` is a callback the Trainer adds by default. It logs the compile time of each
train program once (``logging.getLogger("nnxfit.compile")`` at INFO) and warns once per fit,
naming the batch leaf and its shapes, when a batch shape never seen before forces a recompile
after the first epoch. It costs nothing per step: ``step.Programs`` calls ``on_trace`` from
the Python body of the jitted step, which only runs while jax traces a new input signature,
and the compile times arrive through ``jax.monitoring`` listeners that fire only on compiles.

``enable_compilation_cache(path)`` turns on jax's persistent compilation cache, so that a
restarted run loads its step programs from disk instead of compiling them again.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import jax
from jax import monitoring

from nnxfit.callbacks.base import Callback
from nnxfit.warn import warn

logger = logging.getLogger("nnxfit.compile")

# Events jax 0.10.2 records around every compile (jax/_src/dispatch.py, compiler.py).
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
# ``fun_name`` jax gives the jitted methods of ``step.Programs``.
STEP_FUNCTIONS = {"_single": "single", "_multi": "multi"}


class RecompileWarning(UserWarning):
    """A train program was compiled again mid-fit for a batch shape not seen before."""


@dataclass
class CompileRecord:
    """One compiled train program: which, for what batch shapes, and what it cost."""

    kind: str  # "single" (one step per call) or "multi" (a lax.scan over K steps)
    shapes: tuple  # per batch leaf: (shape, dtype name) as the program sees it (stacked)
    step: int  # trainer.global_step when it was traced
    epoch: int
    trace_s: float = 0.0
    lower_s: float = 0.0
    compile_s: float = 0.0
    cached: bool = False  # loaded from the persistent compilation cache
    done: bool = field(default=False, repr=False)

    @property
    def total_s(self) -> float:
        return self.trace_s + self.lower_s + self.compile_s


class CompileWatch(Callback):
    """Logs each train program's compile time once; warns once on a mid-fit recompile.

    ``warn=False`` keeps the log lines and ``records`` but never warns. ``records`` lists a
    ``CompileRecord`` per compiled train program of the current (or last) fit.
    """

    order = -1000  # first: its hooks only arm and disarm listeners
    reads_module = False
    epoch_end_barrier = False  # records only

    def __init__(self, warn: bool = True):
        self.warn = warn
        self.records: list[CompileRecord] = []
        self._trainer = None
        self._programs = None
        self._pending: CompileRecord | None = None
        self._thread: int | None = None
        self._seen_batch_shapes: set = set()
        self._start_epoch = 0
        self._warned = False
        self._listening = False
        self._paths: list[str] | None = None

    # -- hooks ----------------------------------------------------------------------------
    def on_fit_start(self, trainer, module) -> None:
        self.records = []
        self._seen_batch_shapes = set()
        self._warned = False
        self._pending = None
        self._paths = None
        self._trainer = trainer
        self._start_epoch = trainer.current_epoch
        self._programs = getattr(trainer, "_programs", None)
        if self._programs is None:
            return
        self._programs.on_trace = self._on_trace
        if not self._listening:
            monitoring.register_event_duration_secs_listener(self._on_duration)
            monitoring.register_event_listener(self._on_event)
            self._listening = True

    def on_fit_end(self, trainer, module) -> None:
        if self._listening:
            monitoring.unregister_event_duration_listener(self._on_duration)
            monitoring.unregister_event_listener(self._on_event)
            self._listening = False
        if self._programs is not None and getattr(self._programs, "on_trace", None) == (
            self._on_trace
        ):
            self._programs.on_trace = None
        self._trainer = None

    # -- called by step.Programs while tracing ------------------------------------------
    def _on_trace(self, kind: str, batch_leaves: list) -> None:
        tr = self._trainer
        shapes = tuple((tuple(x.shape), str(x.dtype)) for x in batch_leaves)
        # The step and epoch being dispatched: the hooks' counters may trail them (lookahead).
        epoch = (
            (tr.dispatch_epoch if tr.dispatch_epoch is not None else tr.current_epoch) if tr else 0
        )
        rec = CompileRecord(kind, shapes, tr.dispatch_step if tr else 0, epoch)
        self._pending = rec
        self._thread = threading.get_ident()
        self.records.append(rec)

        per_batch = self._per_batch_shapes(kind, shapes)
        new = per_batch not in self._seen_batch_shapes
        mid_fit = tr is not None and epoch > self._start_epoch
        if new and mid_fit and self.warn and not self._warned and self._seen_batch_shapes:
            self._warned = True
            warn(self._recompile_message(rec, per_batch), RecompileWarning)
        self._seen_batch_shapes.add(per_batch)

    def _per_batch_shapes(self, kind: str, shapes: tuple) -> tuple:
        """Shapes of one batch: drops the axes the Trainer stacks (K steps, A micro-batches),
        so a short tail group of steps (the Trainer's own doing) is not a new data shape."""
        accum = getattr(getattr(self._programs, "config", None), "grad_accum_steps", 1)
        drop = (1 if kind == "multi" else 0) + (1 if accum > 1 else 0)
        return tuple((s[drop:], d) for s, d in shapes)

    def _leaf_paths(self, n: int) -> list[str]:
        if self._paths is None:
            treedef = getattr(self._programs, "batch_def", None)
            try:
                dummy = jax.tree.unflatten(treedef, list(range(treedef.num_leaves)))
                flat = jax.tree_util.tree_flatten_with_path(dummy)[0]
                self._paths = ["batch" + jax.tree_util.keystr(p) for p, _ in flat]
            except Exception:  # noqa: BLE001 - names are cosmetic; fall back to indices
                self._paths = [f"batch leaf {i}" for i in range(n)]
        return self._paths

    def _recompile_message(self, rec: CompileRecord, per_batch: tuple) -> str:
        paths = self._leaf_paths(len(per_batch))
        earlier = sorted(self._seen_batch_shapes, key=str)
        diffs = []
        for i, (shape, dtype) in enumerate(per_batch):
            before = sorted({b[i][0] for b in earlier if i < len(b)})
            if all(shape != s for s in before):
                name = paths[i] if i < len(paths) else f"batch leaf {i}"
                seen = ", ".join(str(s) for s in before)
                diffs.append(f"{name} has shape {shape} ({dtype}); earlier batches {seen}")
        detail = "; ".join(diffs) or f"batch shapes {per_batch}"
        return (
            f"the train step was traced and compiled again at step {rec.step} (epoch "
            f"{rec.epoch}) because {detail}. Every new batch shape compiles a new program "
            "and keeps it in memory; keep batch shapes fixed (ArrayLoader(..., drop_last=True), "
            "or pad batches to one size). This warning is shown once per fit."
        )

    # -- jax.monitoring listeners (fire only around compiles) ----------------------------
    def _on_event(self, event: str, **kwargs: Any) -> None:
        rec = self._pending
        if rec is not None and event == CACHE_HIT_EVENT and self._same_thread():
            rec.cached = True

    def _on_duration(self, event: str, duration: float, **kwargs: Any) -> None:
        rec = self._pending
        if rec is None or not self._same_thread():
            return
        name = str(kwargs.get("fun_name", ""))
        if name.startswith("jit(") and name.endswith(")"):
            name = name[4:-1]
        if name not in STEP_FUNCTIONS:
            return
        if event == TRACE_EVENT:
            rec.trace_s += duration
        elif event == LOWER_EVENT:
            rec.lower_s += duration
        elif event == COMPILE_EVENT:
            rec.compile_s += duration
            rec.done = True
            self._pending = None
            self._log(rec)

    def _same_thread(self) -> bool:
        return self._thread == threading.get_ident()

    def _log(self, rec: CompileRecord) -> None:
        shapes = ", ".join(f"{d}{list(s)}" for s, d in rec.shapes)
        how = "loaded from the compilation cache" if rec.cached else "compiled"
        logger.info(
            "train step (%s) for batch %s %s in %.2f s (trace %.2f s, lower %.2f s, "
            "compile %.2f s) at step %d",
            rec.kind,
            shapes,
            how,
            rec.total_s,
            rec.trace_s,
            rec.lower_s,
            rec.compile_s,
            rec.step,
        )


def enable_compilation_cache(
    path: str | os.PathLike,
    *,
    min_compile_time_secs: float = 0.0,
    min_entry_size_bytes: int = -1,
) -> str:
    """Turns on jax's persistent compilation cache in ``path`` (created if missing).

    A restarted run then loads its step programs from disk instead of compiling them. jax
    caches only programs that took at least 1 s to compile by default, which leaves out
    most CPU programs; ``min_compile_time_secs=0`` caches every program and
    ``min_entry_size_bytes=-1`` lifts the size floor. The setting is process-wide (it is
    jax's), so call this once at start-up. Returns the absolute cache path.

    The cache is trusted code: never point it at a folder others can write to.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(
            f"compilation cache path {path!r} is a file; pass a folder (created if missing)."
        )
    os.makedirs(path, exist_ok=True)
    previous = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", int(min_entry_size_bytes))
    if previous and previous != path:
        # jax opens its cache once per process; a new folder needs a fresh start.
        from jax.experimental.compilation_cache import compilation_cache

        compilation_cache.reset_cache()
    return path
