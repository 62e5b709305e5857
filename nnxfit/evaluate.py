"""Validation and test runs: ``validation_step`` / ``test_step`` over a dataset on the device,
and the eval programs of a module outside a fit.

``run`` sends every batch through the eval program (``step.Programs.eval_program``), which adds
the step's outputs into one accumulator on the device (``eval_accum.py``: example-weighted
means, whole-set metrics' sums), and reads that accumulator once, at the end. During a fit it
is given ``stop``, called before each batch (it raises when a signal asked the fit to stop:
the validation is cut short and logs nothing), and the host then keeps only
``VAL_MAX_LAG_S`` of batches queued on the device (``pacing.DeviceQueue``; a batch's running
count, not donated, is ready once the device has done it), so that a stop waits for those
rather than for every batch the host had sent.

``EvalPrograms`` caches the eval and predict programs of modules ``validate``, ``test`` and
``predict`` get outside a fit, one per module structure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from nnxfit.carry import wait_ready
from nnxfit.data import BatchSpec, epoch_batches
from nnxfit.errors import EmptyDataError
from nnxfit.optimizers import trainable_filter
from nnxfit.pacing import DeviceQueue
from nnxfit.step import Programs

# During fit, validation keeps about this many seconds of batches queued on the device.
VAL_MAX_LAG_S = 0.1


def run(
    programs: Programs,
    module_leaves: list,
    data: Any,
    *,
    placement,
    method: str = "validation_step",
    limit: int | None = None,
    stop: Callable[[], None] | None = None,
) -> tuple[dict[str, float], dict]:
    """``method`` over the first ``limit`` batches of ``data`` (all: None) on the module state
    ``module_leaves``; returns ``(logs, arrays)``: scalar metrics prefixed ``val_`` or
    ``test_``, and array results (``nnxfit.metrics.ConfusionMatrix``...)."""
    where, prefix = ("test", "test_") if method == "test_step" else ("validation", "val_")
    program = programs.eval_program(method)
    acc = spec = None
    queue = DeviceQueue(VAL_MAX_LAG_S, wait=wait_ready) if stop is not None else None
    for i, batch in enumerate(epoch_batches(data, 0, limit=limit)):
        if stop is not None:
            stop()
        if spec is None:
            batch_spec = BatchSpec(batch, where)
            spec = programs.eval_spec(module_leaves, batch, method)
            acc = placement.put_state(spec.zeros())
        else:
            batch_spec.check(batch, i)
        for part in placement.eval_parts(batch):  # one part unless on a mesh
            acc = program(module_leaves, acc, part.batch)
        if queue is not None:
            queue.sent(acc[1])
    if acc is None:
        raise EmptyDataError(f"{where} data yielded no batch; pass a non-empty loader.")
    wait_ready(jax.tree.leaves(acc))
    return spec.finish(jax.device_get(acc), prefix)


class EvalPrograms:
    """The eval and predict programs of modules outside a fit, one per module structure
    (a module's mode is switched to eval for the split and put back)."""

    def __init__(self):
        self._cache: dict = {}

    def get(self, module, placement) -> tuple[Programs, list]:
        """``(programs, module leaves)`` for ``module`` as it is now."""
        was_training = is_training(module)
        module.eval()
        trainable = trainable_filter(module)
        eval_def, params, rest = nnx.split(module, trainable, ...)
        if was_training:
            module.train()
        params = placement.put_state(nnx.as_pure(params), params)
        rest = placement.put_state(nnx.as_pure(rest), rest)
        params_def, rest_def = jax.tree.structure(params), jax.tree.structure(rest)
        key = (eval_def, params_def, rest_def)
        programs = self._cache.get(key)
        if programs is None:
            programs = Programs.for_eval(eval_def, trainable, params_def, rest_def)
            self._cache[key] = programs
        return programs, jax.tree.leaves(params) + jax.tree.leaves(rest)


def is_training(module: nnx.Module) -> bool:
    """Whether some layer of ``module`` is in train mode (dropout on, statistics updating)."""
    for _, node in nnx.iter_modules(module):
        if getattr(node, "deterministic", None) is False:
            return True
        if getattr(node, "use_running_average", None) is False:
            return True
    return False
