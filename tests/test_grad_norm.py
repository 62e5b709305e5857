"""GradNormMonitor: the logged norm is the real global gradient norm; one warning per
episode outside the range, naming the steps and the value."""

from __future__ import annotations

import warnings

import numpy as np
import optax
import pytest
from flax import nnx

import nnxfit
from nnxfit.callbacks.grad_norm import GradNormMonitor, GradNormWarning

BS = 4


class Scaled(nnxfit.TrainModule):
    """Two top-level submodules; the loss is multiplied by the batch's scale column, so the
    data decides the gradient norm of each step."""

    def __init__(self):
        rngs = nnx.Rngs(0)
        self.enc = nnx.Linear(8, 16, rngs=rngs)
        self.head = nnx.Linear(16, 3, rngs=rngs)

    def training_step(self, batch):
        x, y, s = batch
        logits = self.head(nnx.relu(self.enc(x)))
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() * s.mean()

    def configure_optimizers(self):
        return optax.sgd(1e-6)  # the parameters barely move: the scale sets the norm


def data(scales, steps_each=4):
    rng = np.random.default_rng(0)
    out = []
    for s in scales:
        for _ in range(steps_each):
            x = rng.normal(size=(BS, 8)).astype(np.float32)
            y = rng.integers(0, 3, size=BS).astype(np.int32)
            out.append((x, y, np.full((BS,), s, np.float32)))
    return out


class Logs(nnxfit.Callback):
    def __init__(self):
        self.at = {}

    def on_train_batch_end(self, trainer, module, step, logs):
        if logs:
            self.at[step] = dict(logs)


def fit(batches, callbacks, **kw):
    kw = {"max_epochs": 1, "log_every_n_steps": 4, "progress_bar": False, **kw}
    trainer = nnxfit.Trainer(callbacks=callbacks, **kw)
    module = Scaled()
    return trainer, module, trainer.fit(module, batches)


def test_logs_the_true_global_and_per_module_norms():
    batches = data([1.0], steps_each=2)
    x, y, s = batches[0]
    ref = Scaled()
    grads = nnx.grad(lambda m: m.training_step((x, y, s)))(ref)
    expected = {
        "grad_norm": optax.tree.norm(grads),
        "grad_norm/enc": optax.tree.norm(grads["enc"]),
        "grad_norm/head": optax.tree.norm(grads["head"]),
    }
    logs = Logs()
    _, _, history = fit(batches, [GradNormMonitor(per_module=True), logs], log_every_n_steps=1)
    for k, v in expected.items():
        np.testing.assert_allclose(logs.at[1][k], float(v), rtol=1e-5)
    assert set(history.history) >= set(expected)


def test_one_warning_per_episode():
    # Intervals of 4 steps: ok, high, ok, high, high, low, ok, NaN.
    scales = [1.0, 1000.0, 1.0, 1000.0, 1000.0, 0.0, 1.0, np.nan]
    mon = GradNormMonitor(per_module=True)
    logs = Logs()
    with pytest.warns(GradNormWarning) as rec:
        fit(data(scales), [mon, logs])
    assert 0.1 < logs.at[4]["grad_norm"] < 10  # the healthy baseline
    assert [s for s, _ in mon.warnings_issued] == [8, 16, 24, 32]
    texts = [str(w.message) for w in rec]
    assert len(texts) == 4
    assert "over steps 5-8 and is above max_norm=10 (exploding gradients)" in texts[0]
    assert "Trainer(grad_clip_norm=...)" in texts[0]
    assert "largest submodule norm: " in texts[0]
    assert "over steps 13-16 and is above max_norm=10" in texts[1]  # steps 17-20 stay silent
    assert "grad_norm averaged 0 over steps 21-24 and is below min_norm=0.1 (vanishing" in texts[2]
    assert "grad_norm averaged nan over steps 29-32 and is not finite: add NaNGuard" in texts[3]
    np.testing.assert_allclose(mon.warnings_issued[0][1], logs.at[8]["grad_norm"])


def test_epoch_shorter_than_the_log_interval_is_checked_at_epoch_end():
    mon = GradNormMonitor(max_norm=5.0)
    with pytest.warns(GradNormWarning, match=r"over epoch 1 \(to step 4\) and is above max_norm=5"):
        fit(data([1000.0]), [mon], log_every_n_steps=100, max_epochs=2)
    assert len(mon.warnings_issued) == 1  # epoch 2 is the same episode


def test_one_sided_ranges_and_warn_false():
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradNormWarning)
        fit(data([0.0, 1000.0]), [GradNormMonitor(min_norm=None, max_norm=None)])
        quiet = GradNormMonitor(warn=False)
        _, _, history = fit(data([1000.0]), [quiet])
    assert quiet.warnings_issued == [] and history.history["grad_norm"][0] > 10
    only_high = GradNormMonitor(min_norm=None, max_norm=10.0)
    with pytest.warns(GradNormWarning, match="above"):
        fit(data([0.0, 1000.0]), [only_high])
    assert [s for s, _ in only_high.warnings_issued] == [8]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"min_norm": 5.0, "max_norm": 1.0}, "min_norm=5.0 is above max_norm=1.0"),
        ({"min_norm": -1.0}, "min_norm must be a number >= 0"),
        ({"max_norm": "big"}, "max_norm must be a number >= 0"),
        ({"max_norm": float("nan")}, "max_norm must be a number >= 0"),
    ],
)
def test_impossible_ranges_fail_at_construction(kwargs, match):
    with pytest.raises(nnxfit.ConfigError, match=match):
        GradNormMonitor(**kwargs)


def test_features_requested_from_the_step():
    assert GradNormMonitor().step_features == {"grad_norm"}
    assert GradNormMonitor(per_module=True).step_features == {"grad_norm", "module_grad_norms"}
    _, _, history = fit(data([1.0]), [])
    assert "grad_norm" not in history.history  # computed only when asked for
