"""Recompilation guard and persistent compilation cache.

``CompileWatch`` is a callback the Trainer adds by default. It logs the compile time of each
train and validation program (``logging.getLogger("nnxfit.compile")`` at INFO) and, after the
first epoch, warns once per program (``RecompileWarning``) when the fit's train or validation
step compiles again, naming what changed:

* a batch shape never seen before (the batch leaf and its shapes);
* a state input whose signature changed: its dtype, weak type, shape, or placement (device
  or sharding, committed or not), named by its path in the training state with the old and
  the new signature. A changed placement makes jax compile again without tracing again.

It costs nothing per step. Compiles are seen through ``jax.monitoring`` listeners, which jax
calls only around a trace, a lowering or a compile; ``step.Programs`` calls ``on_trace`` from
the Python body of the jitted train step, which runs only while jax traces it. The signature
of the training state is taken only then, at a compile.

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
from nnxfit.hyperparams import describe
from nnxfit.warn import warn

logger = logging.getLogger("nnxfit.compile")

# Events jax 0.10.2 records around every compile (jax/_src/dispatch.py, compiler.py): a
# trace only for a new input type signature, a lowering and a compile also for a new
# placement of the same types (jax's cache keys hold shardings and committedness).
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
# ``fun_name`` jax gives the jitted methods of ``step.Programs``.
STEP_FUNCTIONS = {"_single": "single", "_multi": "multi", "_eval": "eval"}
# The training-state keys the validation step reads (module state).
EVAL_KEYS = ("params", "rest")
MAX_NAMED = 3  # changed leaves named in a warning


class RecompileWarning(UserWarning):
    """The fit's train or validation step was compiled again after the first epoch."""


@dataclass
class CompileRecord:
    """One compiled program: which, for what batch shapes, and what it cost."""

    # "single" (one train step per call), "multi" (a lax.scan over K steps), or "eval"
    kind: str
    shapes: tuple  # per batch leaf: (shape, dtype name) as the program sees it; () untraced
    step: int  # trainer.global_step when it was compiled (steps dispatched, for train)
    epoch: int
    trace_s: float = 0.0
    lower_s: float = 0.0
    compile_s: float = 0.0
    cached: bool = False  # loaded from the persistent compilation cache
    done: bool = field(default=False, repr=False)
    # False: jax compiled again without tracing: the same types in a new placement.
    traced: bool = True
    # "path: old -> new" for each state input whose signature differs from the closest one
    # the program was compiled for before in this fit.
    changed: tuple = ()

    @property
    def total_s(self) -> float:
        return self.trace_s + self.lower_s + self.compile_s


class CompileWatch(Callback):
    """Logs each program's compile time; warns once per program on a recompile after the
    first epoch.

    ``warn=False`` keeps the log lines and records but never warns. ``records`` lists a
    ``CompileRecord`` per compile of a train program in the current (or last) fit, appended
    when the compile starts (``done`` once finished); ``eval_records`` those of the
    validation step.
    """

    order = -1000  # first: its hooks only arm and disarm listeners
    records_only = True

    def __init__(self, warn: bool = True):
        self.warn = warn
        self.records: list[CompileRecord] = []
        self.eval_records: list[CompileRecord] = []
        self._trainer = None
        self._programs = None
        self._pending: CompileRecord | None = None
        self._new_shape = False  # the pending train record's batch shapes are new
        self._pending_batch: tuple = ()  # and those shapes, per batch
        self._thread: int | None = None
        self._seen_batch_shapes: set = set()
        self._signatures: dict[str, list] = {}  # "train"/"eval" -> state signatures compiled
        self._start_epoch = 0
        self._warned: set[str] = set()
        self._listening = False
        self._paths: list[str] | None = None

    # -- hooks ----------------------------------------------------------------------------
    def on_fit_start(self, trainer, module) -> None:
        self.records, self.eval_records = [], []
        self._seen_batch_shapes = set()
        self._signatures = {}
        self._warned = set()
        self._pending = None
        self._paths = None
        self._trainer = trainer
        self._thread = threading.get_ident()  # the fit's thread: it runs every program
        self._start_epoch = trainer.current_epoch
        self._programs = trainer.programs
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

    # -- called by step.Programs while tracing a train program --------------------------
    def _on_trace(self, kind: str, batch_leaves: list) -> None:
        if self._trainer is None:
            return
        shapes = tuple((tuple(x.shape), str(x.dtype)) for x in batch_leaves)
        self._start(kind, shapes, traced=True)
        per_batch = self._per_batch_shapes(kind, shapes)
        seen = self._seen_batch_shapes
        self._new_shape = bool(seen) and per_batch not in seen
        self._pending_batch = per_batch
        seen.add(per_batch)

    def _start(self, kind: str, shapes: tuple, traced: bool) -> CompileRecord:
        tr = self._trainer
        if kind == "eval" or tr.dispatch_epoch is None:  # validation runs in step with hooks
            step, epoch = tr.global_step, tr.current_epoch
        else:  # the step and epoch being dispatched: the hooks' counters may trail them
            step, epoch = tr.dispatch_step, tr.dispatch_epoch
        rec = CompileRecord(kind, shapes, step, epoch, traced=traced)
        (self.eval_records if kind == "eval" else self.records).append(rec)
        self._pending = rec
        self._new_shape = False
        return rec

    def _per_batch_shapes(self, kind: str, shapes: tuple) -> tuple:
        """Shapes of one batch: drops the axes the Trainer stacks (K steps, A micro-batches),
        so a short tail group of steps (the Trainer's own doing) is not a new data shape."""
        accum = getattr(getattr(self._programs, "config", None), "grad_accum_steps", 1)
        drop = (1 if kind == "multi" else 0) + (1 if accum > 1 else 0)
        return tuple((s[drop:], d) for s, d in shapes)

    # -- jax.monitoring listeners (fire only around compiles) ----------------------------
    def _on_event(self, event: str, **kwargs: Any) -> None:
        rec = self._pending
        if rec is not None and event == CACHE_HIT_EVENT and self._same_thread():
            rec.cached = True

    def _on_duration(self, event: str, duration: float, **kwargs: Any) -> None:
        if event not in (TRACE_EVENT, LOWER_EVENT, COMPILE_EVENT) or not self._same_thread():
            return
        name = str(kwargs.get("fun_name", ""))
        if name.startswith("jit(") and name.endswith(")"):
            name = name[4:-1]
        kind = STEP_FUNCTIONS.get(name)
        if kind is None or self._trainer is None:
            return
        rec = self._pending
        fresh = rec is None or rec.done or rec.kind != kind
        if event == TRACE_EVENT:
            if kind == "eval":  # train records start in _on_trace, which knows the batch
                rec = self._start(kind, (), traced=True)
            elif fresh:
                return
            rec.trace_s += duration
            return
        if fresh:  # lowered without a trace: the same types, placed differently
            rec = self._start(kind, (), traced=False)
        if event == LOWER_EVENT:
            rec.lower_s += duration
            return
        rec.compile_s += duration
        rec.done = True
        self._pending = None
        self._finish(rec)

    def _same_thread(self) -> bool:
        return self._thread == threading.get_ident()

    # -- at the end of each compile ------------------------------------------------------
    def _finish(self, rec: CompileRecord) -> None:
        group = "eval" if rec.kind == "eval" else "train"
        sig = self._signature(group)
        seen = self._signatures.setdefault(group, [])
        # Against the closest earlier signature that differs: an earlier one equal to this
        # was another program (another batch shape), or jax would not compile again.
        diffs = [d for before in seen if (d := self._diff(before, sig))]
        rec.changed = min(diffs, key=len) if diffs else ()
        if sig and sig not in seen:
            seen.append(sig)
        self._log(rec)
        mid_fit = rec.epoch > self._start_epoch
        if not (self.warn and mid_fit) or group in self._warned:
            return
        if group == "train" and rec.traced and self._new_shape:
            msg = self._recompile_message(rec, self._pending_batch)
        elif rec.changed:
            msg = self._state_message(rec)
        elif not rec.traced:
            msg = self._placement_message(rec)
        else:  # a tail group, a gated program, a new validation batch shape: expected
            return
        self._warned.add(group)
        warn(msg, RecompileWarning)

    @staticmethod
    def _diff(before: dict, now: dict) -> tuple:
        return tuple(
            f"{path}: {before[path][1]} -> {new[1]}"
            for path, new in now.items()
            if path in before and before[path][0] != new[0]
        )

    def _signature(self, group: str) -> dict:
        """path -> (cache key part, description) of each training-state input of the
        ``group``'s program as it is now (inside the call that compiles)."""
        try:
            state = self._trainer.train_state()
            if group == "eval":
                state = {k: state[k] for k in EVAL_KEYS if k in state}
            out = {}
            for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
                name = jax.tree_util.keystr(path)  # "['opt'].count" -> "opt.count"
                name = name[2:].replace("']", "", 1) if name.startswith("['") else name
                if isinstance(x, jax.Array):
                    key = (str(jax.typeof(x)), x.committed, x.sharding)
                else:
                    key = (type(x).__name__, None, None)
                out[name] = (key, describe(x))
            return out
        except Exception:  # noqa: BLE001 - diagnostics only; never fail a compile
            return {}

    # -- messages ------------------------------------------------------------------------
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
        earlier = sorted(self._seen_batch_shapes - {per_batch}, key=str)
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

    @staticmethod
    def _what(rec: CompileRecord) -> str:
        return "validation step" if rec.kind == "eval" else "train step"

    def _state_message(self, rec: CompileRecord) -> str:
        named = "; ".join(rec.changed[:MAX_NAMED])
        more = len(rec.changed) - MAX_NAMED
        if more > 0:
            named += f"; and {more} more"
        return (
            f"the {self._what(rec)} was compiled again at step {rec.step} (epoch {rec.epoch}) "
            f"because training-state inputs differ from those it was compiled for: {named} "
            "(~ marks a weak type). jax compiles a program per input signature: dtype, weak type, "
            "shape, and placement (device or sharding, committed to a device or not). Whatever "
            "writes into the training state must keep all of them: from a callback, set "
            "optimizer hyperparameters with trainer.set_hyperparameter(name, value), and give "
            "module variables arrays made like the ones they hold. This warning is shown once "
            "per fit."
        )

    def _placement_message(self, rec: CompileRecord) -> str:
        return (
            f"the {self._what(rec)} was compiled again at step {rec.step} (epoch {rec.epoch}) "
            "for inputs of the same types: an input changed placement (device or sharding, "
            "or committed to a device where it was not, e.g. by jax.device_put). Give the "
            "step arrays placed as before; batches as the loader yielded them at first. This "
            "warning is shown once per fit."
        )

    def _log(self, rec: CompileRecord) -> None:
        how = "loaded from the compilation cache" if rec.cached else "compiled"
        if rec.kind == "eval":
            what = "validation step"
        else:
            what = f"train step ({rec.kind})"
        if rec.shapes:
            what += " for batch " + ", ".join(f"{d}{list(s)}" for s, d in rec.shapes)
        if not rec.traced:
            what += " again for new input placements"
        logger.info(
            "%s %s in %.2f s (trace %.2f s, lower %.2f s, compile %.2f s) at step %d",
            what,
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
