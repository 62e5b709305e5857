"""Several optimizers and manual optimization: a fit equals a hand-written NNX loop with one
``nnx.Optimizer`` per filter (several losses, automatic; a two-player update, manual), at one
step per call and four; a resumed manual fit ends bit for bit where an uninterrupted one ends;
the misconfigurations are errors or warnings naming the names and a path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import nnxfit
from nnxfit.callbacks import (
    EMA,
    GradNormMonitor,
    LearningRateMonitor,
    ModelCheckpoint,
    NaNGuard,
    ReduceLROnPlateau,
    SpikeGuard,
)
from nnxfit.callbacks.grad_norm import GradNormWarning
from nnxfit.errors import ConfigError, StepOutputError

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
import train_and_signal as child  # noqa: E402

BS, N = 8, 8
_rng = np.random.default_rng(0)
X = _rng.normal(size=(BS * N, 4)).astype(np.float32)
Y = (X @ np.array([1.0, -2.0, 0.5, 3.0], np.float32)).astype(np.float32)
DATA = [(X[i * BS : (i + 1) * BS], Y[i * BS : (i + 1) * BS]) for i in range(N)]

ENC = nnx.All(nnx.Param, nnx.PathContains("enc"))
HEAD = nnx.All(nnx.Param, nnx.PathContains("head"))
GEN = nnx.All(nnx.Param, nnx.PathContains("gen"))
DISC = nnx.All(nnx.Param, nnx.PathContains("disc"))


def arrays(tree) -> list[np.ndarray]:
    def host(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.array(x, copy=True)

    return [host(x) for x in jax.tree.leaves(tree)]


def assert_close(got, want, atol=1e-6):
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=atol)


def fit(module, *, callbacks=(), data=DATA, **kw):
    kw = {"max_steps": N, "progress_bar": False, "log_every_n_steps": 2, **kw}
    trainer = nnxfit.Trainer(callbacks=list(callbacks), **kw)
    return trainer, trainer.fit(module, data)


# -- several losses, automatic -----------------------------------------------------------------
class TwoLosses(nnxfit.TrainModule):
    """An encoder trained by SGD on a squared error and a head trained by Adam on an absolute
    error of the same prediction."""

    trainable = {"enc": ENC, "head": HEAD}

    def __init__(self, lr=None):
        rngs = nnx.Rngs(0)
        self.enc = nnx.Linear(4, 8, rngs=rngs)
        self.head = nnx.Linear(8, 1, rngs=rngs)
        self.lr = lr

    def losses(self, batch):
        x, y = batch
        p = self.head(nnx.relu(self.enc(x)))[:, 0]
        return {"enc": ((p - y) ** 2).mean(), "head": jnp.abs(p - y).mean()}

    def training_step(self, batch):
        losses = self.losses(batch)
        return losses, {"gap": losses["enc"] - losses["head"]}

    def validation_step(self, batch):
        return self.losses(batch)

    def configure_optimizers(self):
        if self.lr is not None:  # settable rates, for ReduceLROnPlateau
            inject = optax.inject_hyperparams
            return {"enc": inject(optax.sgd)(self.lr), "head": inject(optax.adam)(self.lr)}
        return {"enc": optax.sgd(0.05), "head": optax.adam(1e-2)}


def hand_two_losses(steps):
    """The same training as a hand-written NNX loop: two nnx.Optimizers, both gradients
    taken from the same state, then both updates."""
    m = TwoLosses()
    opts = {"enc": nnx.Optimizer(m, optax.sgd(0.05), wrt=ENC)}
    opts["head"] = nnx.Optimizer(m, optax.adam(1e-2), wrt=HEAD)

    @nnx.jit
    def step(m, opts, batch):
        grads = {}
        for name, f in (("enc", ENC), ("head", HEAD)):
            _, grads[name] = nnx.value_and_grad(
                lambda m, n=name: m.losses(batch)[n], argnums=nnx.DiffState(0, f)
            )(m)
        for name in ("enc", "head"):
            opts[name].update(m, grads[name])

    for batch in DATA[:steps]:
        step(m, opts, batch)
    return m, opts


@pytest.mark.parametrize("spe", [1, 4])
def test_several_optimizers_equal_a_hand_loop_with_two_nnx_optimizers(spe):
    module = TwoLosses()
    trainer, history = fit(module, steps_per_execution=spe)
    want, opts = hand_two_losses(N)
    assert_close(arrays(nnx.state(module, nnx.Param)), arrays(nnx.state(want, nnx.Param)))
    opt = trainer.train_state()["opt"]
    assert sorted(opt) == ["enc", "head"]
    assert_close(arrays(opt["head"]), arrays(nnx.as_pure(opts["head"].opt_state)))
    h = history.history
    assert {"loss", "loss_enc", "loss_head", "gap"} <= set(h)
    np.testing.assert_allclose(h["loss"], np.add(h["loss_enc"], h["loss_head"]), rtol=1e-6)


def test_several_optimizers_log_lr_and_grad_norm_per_optimizer_and_reduce_one_by_name():
    module = TwoLosses(lr=0.05)
    reduce = ReduceLROnPlateau(monitor="loss", mode="max", patience=0, optimizer="head")
    trainer, history = fit(
        module,
        callbacks=[LearningRateMonitor(), GradNormMonitor(warn=False), reduce],
        max_steps=3 * N,
    )
    h = history.history
    assert {"lr_enc", "lr_head", "grad_norm", "grad_norm_enc", "grad_norm_head"} <= set(h)
    assert h["lr_enc"] == pytest.approx([0.05] * 3)
    # mode="max" on a falling loss: epoch 2 reduces the head's rate, epoch 3 uses it.
    assert h["lr_head"] == pytest.approx([0.05, 0.05, 0.005])
    assert trainer.get_hyperparameter("learning_rate", optimizer="enc") == pytest.approx(0.05)
    norm = np.hypot(h["grad_norm_enc"], h["grad_norm_head"])
    assert np.all(norm >= np.asarray(h["grad_norm"]) * 0.5)  # means of per-step norms
    with pytest.raises(ConfigError, match=r"optimizers \['enc', 'head'\].*optimizer="):
        trainer.get_hyperparameter("learning_rate")


def test_reduce_lr_on_plateau_reduces_every_optimizer_by_default():
    module = TwoLosses(lr=0.05)
    reduce = ReduceLROnPlateau(monitor="loss", mode="max", patience=0, verbose=False)
    _, history = fit(module, callbacks=[LearningRateMonitor(), reduce], max_steps=3 * N)
    assert history.history["lr_enc"] == pytest.approx([0.05, 0.05, 0.005])
    assert history.history["lr_head"] == pytest.approx([0.05, 0.05, 0.005])


def test_several_optimizers_with_accumulation_clipping_and_bfloat16():
    """Each optimizer's gradient is accumulated over micro-batches and clipped by its own
    norm: with a clip far below the norms, each update has exactly that norm (SGD, lr 1)."""

    class Clipped(TwoLosses):
        def configure_optimizers(self):
            return {"enc": optax.sgd(1.0), "head": optax.sgd(1.0)}

    module = Clipped()
    before = {n: arrays(nnx.state(module, f)) for n, f in (("enc", ENC), ("head", HEAD))}
    trainer, history = fit(module, max_steps=1, grad_accum_steps=2, grad_clip_norm=1e-3)
    for name, f in (("enc", ENC), ("head", HEAD)):
        delta = [a - b for a, b in zip(arrays(nnx.state(module, f)), before[name], strict=True)]
        assert np.sqrt(sum((d.astype(np.float64) ** 2).sum() for d in delta)) == pytest.approx(
            1e-3, rel=1e-3
        )
    _, history = fit(TwoLosses(), max_steps=4, precision="bfloat16")
    assert np.isfinite(history.history["loss_head"]).all()


def test_validate_outside_a_fit_and_lr_find_with_several_optimizers():
    trainer = nnxfit.Trainer(max_steps=1, progress_bar=False)
    logs = trainer.validate(TwoLosses(), DATA)
    assert set(logs) == {"val_enc", "val_head"}
    with pytest.raises(ConfigError, match=r"optimizers \['enc', 'head'\]; lr_find drives one"):
        nnxfit.lr_find(TwoLosses(), DATA, num_steps=4)


# -- manual optimization ----------------------------------------------------------------------
class TwoPlayer(nnxfit.TrainModule):
    """A tiny GAN-shaped game on the regression data: the discriminator scores (x, y) pairs,
    the generator maps x and noise (from the module's own Rngs) to a fake y."""

    automatic_optimization = False
    trainable = {"disc": DISC, "gen": GEN}

    def __init__(self, rngs_seed=1):
        rngs = nnx.Rngs(0)
        self.gen = nnx.Linear(5, 1, rngs=rngs)
        self.disc = nnx.Sequential(
            nnx.Linear(5, 8, rngs=rngs), nnx.tanh, nnx.Linear(8, 1, rngs=rngs)
        )
        self.noise = nnx.Rngs(noise=rngs_seed)

    def fake(self, x):
        z = jax.random.normal(self.noise.noise(), (x.shape[0], 1))
        return self.gen(jnp.concatenate([x, z], -1))

    def score(self, x, y):
        return self.disc(jnp.concatenate([x, y], -1))[:, 0]

    def play(self, batch, opts):
        x, y = batch
        fake = jax.lax.stop_gradient(self.fake(x))

        def d_loss(m):
            real, bad = m.score(x, y[:, None]), m.score(x, fake)
            return optax.sigmoid_binary_cross_entropy(real, 1.0).mean() + (
                optax.sigmoid_binary_cross_entropy(bad, 0.0).mean()
            )

        loss_d, g = nnx.value_and_grad(d_loss, argnums=nnx.DiffState(0, DISC))(self)
        opts["disc"].update(self, g)

        def g_loss(m):
            return optax.sigmoid_binary_cross_entropy(m.score(x, m.fake(x)), 1.0).mean()

        loss_g, g = nnx.value_and_grad(g_loss, argnums=nnx.DiffState(0, GEN))(self)
        opts["gen"].update(self, g)
        return loss_d + loss_g, {"loss_d": loss_d, "loss_g": loss_g}

    def training_step(self, batch):
        return self.play(batch, self.optimizers())

    def configure_optimizers(self):
        return {"disc": optax.sgd(0.1), "gen": optax.adam(1e-2)}


def hand_two_player(steps):
    m = TwoPlayer()
    opts = {"disc": nnx.Optimizer(m, optax.sgd(0.1), wrt=DISC)}
    opts["gen"] = nnx.Optimizer(m, optax.adam(1e-2), wrt=GEN)
    step = nnx.jit(lambda m, opts, batch: m.play(batch, opts))
    for batch in DATA[:steps]:
        step(m, opts, batch)
    return m, opts


@pytest.mark.parametrize("spe", [1, 4])
def test_manual_two_player_update_equals_the_hand_loop(spe):
    module = TwoPlayer()
    trainer, history = fit(module, steps_per_execution=spe)
    want, opts = hand_two_player(N)
    assert_close(arrays(nnx.state(module)), arrays(nnx.state(want)))
    opt = trainer.train_state()["opt"]
    assert_close(arrays(opt["gen"]), arrays(nnx.as_pure(opts["gen"].opt_state)))
    assert int(trainer.train_state()["extra"]["opt_steps"]["gen"]) == N
    h = history.history
    assert {"loss", "loss_d", "loss_g"} <= set(h) and len(h["loss"]) == 1
    # the step compiles once per shape (one single-step program, or one K-step scan)
    assert trainer.programs.trace_count == 1


@pytest.mark.parametrize("cls", [TwoPlayer, TwoLosses], ids=["manual", "several"])
def test_a_resumed_fit_ends_bit_for_bit_where_an_uninterrupted_one_ends(tmp_path, cls):
    """Each optimizer's state, the manual optimizers' step counts, the RNG and EMA."""

    def run(workdir, max_steps, resume=False):
        trainer = nnxfit.Trainer(
            max_steps=max_steps,
            workdir=workdir,
            callbacks=[ModelCheckpoint(every_n_steps=4), EMA(decay=0.5)],
            progress_bar=False,
            log_every_n_steps=2,
            steps_per_execution=2,
        )
        data = nnxfit.data.ArrayLoader((X, Y), batch_size=BS, shuffle=True)
        trainer.fit(cls(), data, resume=resume)
        return trainer

    ref = run(tmp_path / "ref", N + 4)
    loaded = cls()
    nnxfit.load_checkpoint(loaded, tmp_path / "ref", "last")
    want = arrays(ref.train_state()["params"])  # the checkpoint of the last step
    assert all(map(np.array_equal, arrays(nnx.state(loaded, nnx.Param)), want))
    run(tmp_path / "run", 4)
    trainer = run(tmp_path / "run", N + 4, resume=True)
    assert trainer.resumed_from == str(tmp_path / "run" / "checkpoints" / "4")
    got, want = child.state_arrays(trainer), child.state_arrays(ref)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def poisoned(cls):
    """``cls`` whose loss is NaN (or huge) on the batch marked by x[0, 0] = 1000 (or 500)."""

    class Poisoned(cls):
        def training_step(self, batch):
            x, _ = batch
            bad = jnp.where(x[0, 0] > 900.0, jnp.nan, jnp.where(x[0, 0] > 400.0, 1e4, 0.0))
            if self.automatic_optimization:
                losses, metrics = super().training_step(batch)
                return {**losses, "enc": losses["enc"] + bad}, metrics
            loss, metrics = self.play(batch, self.optimizers())
            return loss + bad, metrics

    return Poisoned


@pytest.mark.parametrize("cls", [TwoPlayer, TwoLosses], ids=["manual", "several"])
@pytest.mark.parametrize("guard", ["nan", "spike"])
def test_a_skipped_step_keeps_the_whole_previous_state(cls, guard):
    """NaNGuard("skip") on a non-finite loss, SpikeGuard on a spiking one: the fit ends as
    one that never saw the batch (in manual mode the RNG state too, so the later steps draw
    the noise the clean fit draws)."""
    data = [(x.copy(), y) for x, y in DATA]
    data[5][0][0, 0] = 1000.0 if guard == "nan" else 500.0
    clean = [d for i, d in enumerate(data) if i != 5]
    if guard == "nan":
        callbacks, count = [NaNGuard("skip")], "nonfinite_steps"
    else:
        callbacks, count = [SpikeGuard(window=4, threshold=6.0)], "spike_steps"
    module = poisoned(cls)()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, history = fit(module, data=data, callbacks=callbacks)
    assert history.history[count] == [1.0]
    ref = poisoned(cls)()
    fit(ref, data=clean, max_steps=N - 1)
    assert_close(arrays(nnx.state(module)), arrays(nnx.state(ref)))


def test_on_a_mesh_both_modes_equal_one_device_and_compile_once():
    script = os.path.join(os.path.dirname(__file__), "scripts", "optimizers_mesh.py")
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    for name, r in json.loads(lines[-1][len("RESULTS ") :]).items():
        assert r["rel_diff"] < 2e-5, name
        assert r["trace_count"] == 1, name
        assert r["devices"] == 4, name  # the optimizer state lives on the mesh


def test_manual_single_optimizer_and_optimizers_outside_a_step():
    class One(nnxfit.TrainModule):
        automatic_optimization = False

        def __init__(self):
            self.lin = nnx.Linear(4, 1, rngs=nnx.Rngs(0))

        def training_step(self, batch):
            x, y = batch
            opt = self.optimizers()
            assert isinstance(opt, nnx.Optimizer)

            def loss(m):
                return ((m.lin(x)[:, 0] - y) ** 2).mean()

            value, g = nnx.value_and_grad(loss)(self)
            opt.update(self, g)
            return value

        def configure_optimizers(self):
            return optax.sgd(0.05)

    module = One()
    with pytest.raises(ConfigError, match=r"optimizers\(\) returns .* inside training_step"):
        module.optimizers()
    _, history = fit(module, callbacks=[LearningRateMonitor()])
    assert history.history["lr"] == pytest.approx([0.05])
    m = One()
    opt = nnx.Optimizer(m, optax.sgd(0.05), wrt=nnx.Param)
    for x, y in DATA:
        _, g = nnx.value_and_grad(lambda m, x=x, y=y: ((m.lin(x)[:, 0] - y) ** 2).mean())(m)
        opt.update(m, g)
    assert_close(arrays(nnx.state(module)), arrays(nnx.state(m)))


def test_grad_norm_monitor_with_manual_optimization_warns_once_and_the_fit_goes_on():
    with pytest.warns(GradNormWarning, match="GradNormMonitor.*automatic_optimization = False"):
        _, history = fit(TwoPlayer(), callbacks=[GradNormMonitor()])
    assert "grad_norm" not in history.history and "loss" in history.history


# -- misconfigurations ------------------------------------------------------------------------
def make(cls_attrs=None, optimizers=None):
    attrs = {"trainable": {"enc": ENC, "head": HEAD}, **(cls_attrs or {})}
    if optimizers is not None:
        attrs["configure_optimizers"] = lambda self: optimizers
    return type("Custom", (TwoLosses,), attrs)()


def test_overlapping_filters_are_an_error_naming_both_names_and_a_shared_path():
    module = make({"trainable": {"enc": nnx.Param, "head": HEAD}})
    with pytest.raises(
        ConfigError, match=r"trainable\['enc'\] and trainable\['head'\] overlap.*head\.bias"
    ):
        fit(module)


def test_a_name_missing_on_one_side_is_an_error_naming_it():
    module = make({"trainable": {"enc": ENC, "other": HEAD}})
    with pytest.raises(
        ConfigError,
        match=r"no filter for the optimizers \['head'\].*no optimizer for the filters \['other'\]",
    ):
        fit(module)
    module = make({"trainable": {"enc": ENC, "head": nnx.PathContains("nowhere")}})
    with pytest.raises(ConfigError, match=r"trainable\['head'\] = .* matches no variable"):
        fit(module)
    module = make({"trainable": nnx.Param})
    with pytest.raises(
        ConfigError, match=r"returned the optimizers \['enc', 'head'\].*trainable must be a dict"
    ):
        fit(module)


def test_a_parameter_no_filter_covers_is_named_once_in_a_warning():
    enc_kernel = nnx.All(nnx.Param, nnx.PathContains("enc"), nnx.PathContains("kernel"))
    module = make({"trainable": {"enc": enc_kernel, "head": HEAD}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(module, max_steps=2)
    hits = [w for w in caught if issubclass(w.category, nnxfit.UntrainedParamsWarning)]
    assert len(hits) == 1
    assert "enc.bias" in str(hits[0].message) and "stay frozen" in str(hits[0].message)
    assert hits[0].filename == __file__


def test_manual_optimization_refuses_grad_accum_and_grad_clip():
    for kw in ({"grad_accum_steps": 2}, {"grad_clip_norm": 1.0}):
        with pytest.raises(
            ConfigError, match="clip inside the optimizer|Clip inside the optimizer"
        ):
            fit(TwoPlayer(), **kw)


def test_training_step_must_return_one_loss_per_optimizer():
    module = make({"training_step": lambda self, batch: self.losses(batch)["enc"]})
    with pytest.raises(StepOutputError, match=r"one loss per optimizer.*\['enc', 'head'\]"):
        fit(module)
