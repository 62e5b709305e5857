"""``EvalAPI``: ``validate``, ``test`` and ``predict``, a part of the ``Trainer``.

They run a module's eval programs (``evaluate.py``) on the fit's own state during its fit, or on
a set of programs the Trainer keeps per module structure (``evaluate.EvalPrograms``).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np

from nnxfit import evaluate
from nnxfit.callbacks.base import CallbackList
from nnxfit.callbacks.defaults import default_callbacks, module_callbacks
from nnxfit.data import epoch_batches
from nnxfit.errors import EmptyDataError
from nnxfit.inputs import eval_inputs
from nnxfit.module import TrainModule, attached, has_test_step, has_validation_step
from nnxfit.step import Programs


def with_module(method):
    """Runs ``method(self, module, ...)`` with ``module.trainer`` pointing at this Trainer."""

    @functools.wraps(method)
    def wrapper(self, module, *args, **kwargs):
        with attached(module, self):
            return method(self, module, *args, **kwargs)

    return wrapper


def check_module(module: Any) -> None:
    if not isinstance(module, TrainModule):
        raise TypeError(
            f"expected an nnxfit.TrainModule, got {type(module).__name__}. Subclass "
            "nnxfit.TrainModule and define training_step and configure_optimizers."
        )


class EvalAPI:
    """``validate``, ``test``, ``predict`` and the programs they run."""

    @with_module
    def validate(
        self, module: TrainModule, data: Any, *, batch_size: int | None = None
    ) -> dict[str, float]:
        """``validation_step`` over every example of ``data``, keys prefixed ``val_``: batch
        means averaged over examples, whole-set metrics (``nnxfit.metrics``) computed from
        their sums; array results go to ``trainer.array_metrics``. Arrays (``(x, y)``) are
        batched by ``batch_size`` (32), Keras's ``evaluate``."""
        check_module(module)
        data = eval_inputs(data, batch_size, "validate")
        if not has_validation_step(module):
            module.validation_step(None)  # raises the explanatory NotImplementedError
        if self.fitting and module is self.module:
            return self._validate(data)
        programs, leaves = self._programs_for(module)
        return self._run_validation(programs, leaves, data)

    @with_module
    def test(
        self, module: TrainModule, data: Any, *, batch_size: int | None = None
    ) -> dict[str, float]:
        """``test_step`` over every example of ``data``, as ``validate`` does with
        ``validation_step``; keys prefixed ``test_``. Works on a module never fitted. Calls
        ``on_test_start`` / ``on_test_end(logs)`` of the Trainer's and the module's callbacks
        (the CSVLogger adds a ``kind="test"`` row to ``metrics.csv``)."""
        check_module(module)
        data = eval_inputs(data, batch_size, "test")
        if not has_test_step(module):
            module.test_step(None)  # raises the explanatory NotImplementedError
        user = self.callbacks
        cbs = CallbackList(default_callbacks(self.config, user) + user + module_callbacks(module))
        for cb in cbs.for_hook("on_test_start"):
            cb.on_test_start(self, module)
        programs, leaves = self._programs_for(module)
        limit = self.fast_dev_run or None
        logs = self._run_validation(programs, leaves, data, "test_step", limit)
        for cb in cbs.for_hook("on_test_end"):
            cb.on_test_end(self, module, logs)
        return logs

    @with_module
    def predict(self, module: TrainModule, data: Any, *, batch_size: int | None = None) -> Any:
        """``predict_step`` over every batch of ``data``, concatenated on axis 0 (numpy).
        Arrays (``x``) are batched by ``batch_size`` (32), Keras's ``predict``. Inside a
        callback during fit it runs on the fit's current state in eval mode, changing nothing."""
        check_module(module)
        data = eval_inputs(data, batch_size, "predict")
        programs, leaves = self._programs_for(module)
        outs = []
        for i, batch in enumerate(epoch_batches(data, 0)):
            for part in self.placement.eval_parts(batch):  # one part unless on a mesh
                outs.append((part, programs.predict_batch(leaves, part.batch)))
            if i == 0:
                jax.block_until_ready(outs[0][1])  # surface tracing errors at the first batch
        if not outs:
            raise EmptyDataError("predict got data that yielded no batch.")
        outs = [part.rows(out) for part, out in outs]
        return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *outs)

    def eval_programs(self, module: TrainModule) -> Programs:
        """The programs ``validate``, ``test`` and ``predict`` run ``module`` with: the fit's
        own during its fit; otherwise one set per module structure, kept by the Trainer."""
        return self._programs_for(module)[0]

    def _run_validation(
        self, programs: Programs, module_leaves: list, data: Any, method="validation_step", limit=-1
    ) -> dict:
        """``method`` (``validation_step``/``test_step``) over ``data`` (``evaluate.run``);
        ``limit``: batches to run (None: all; default: ``limit_val_batches``). During fit a
        signal cuts it short (``_interrupt``; its metrics are never logged)."""
        limit = self.limit_val_batches if limit == -1 else limit
        stop = self._stop_if_signalled if self.fitting else None
        logs, arrays = evaluate.run(
            programs, module_leaves, data, placement=self.placement, method=method, limit=limit,
            stop=stop,
        )  # fmt: skip
        prefix = "test_" if method == "test_step" else "val_"
        kept = {k: v for k, v in self.array_metrics.items() if not k.startswith(prefix)}
        self.array_metrics = {**kept, **arrays}  # the latest val_* and the latest test_*
        return logs

    def _programs_for(self, module: TrainModule) -> tuple[Programs, list]:
        if self.fitting and module is self.module:
            return self._carry.programs, self._carry.module_leaves()
        return self._eval_cache.get(module, self.placement)
