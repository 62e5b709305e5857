"""lr_find: the range test runs the module's own optimizer at the test's rates (every
optimizer LearningRateMonitor can read), leaves the caller's module bitwise untouched,
stops right after the smoothed loss diverges, and suggests a rate where the loss falls
fastest on a quadratic, where that range is known."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from models import Classifier, toy_data

import nnxfit
from nnxfit.data import ArrayLoader
from nnxfit.lr_finder import LRFindResult, LRFindWarning, ladder, lr_find, suggest

BATCHES = [np.zeros((1,), np.float32)] * 7  # the quadratic ignores its data


class Quadratic(nnxfit.TrainModule):
    """loss = h/2 |w|^2. SGD at rate lr multiplies w by (1 - lr h): the loss falls fastest
    per step at lr = 1/h (where one step lands on the minimum), and grows above 2/h."""

    def __init__(self, h=1.0, make=lambda: optax.sgd(0.01)):
        self.w = nnx.Param(jnp.ones((4,)))
        self.h, self.make = h, make

    def training_step(self, batch):
        return 0.5 * self.h * jnp.sum(self.w[...] ** 2) + 0.0 * jnp.sum(batch)

    def configure_optimizers(self):
        return self.make()


def sgd_losses(h, lrs, skip_first=False):
    """The exact loss of each step of SGD on the quadratic at the rates ``lrs``."""
    factors = (1 - np.asarray(lrs) * h) ** 2
    if skip_first:
        factors[0] = 1.0
    return 0.5 * h * 4 * np.concatenate([[1.0], np.cumprod(factors)[:-1]])


class ScaleBySchedule(optax.GradientTransformation):
    """SGD written by hand, so that optax's structure shows no rate: only the lr_schedule
    returned next to it does."""

    def __new__(cls, schedule):
        def init(params):
            return jnp.zeros((), jnp.int32)

        def update(g, count, params=None):
            return jax.tree.map(lambda x: -schedule(count) * x, g), count + 1

        return super().__new__(cls, init, update)


SCHEDULE = optax.linear_schedule(0.02, 0.002, 12)
RANGE = {"min_lr": 1e-3, "max_lr": 1.0, "num_steps": 16, "early_stop_threshold": None}


@pytest.mark.parametrize(
    "make",
    [
        lambda: optax.sgd(0.01),
        lambda: optax.sgd(SCHEDULE),
        lambda: optax.inject_hyperparams(optax.sgd)(learning_rate=0.01),
        lambda: optax.inject_hyperparams(optax.sgd)(learning_rate=SCHEDULE),
        lambda: {"optimizer": ScaleBySchedule(SCHEDULE), "lr_schedule": SCHEDULE},
        lambda: optax.chain(optax.clip_by_global_norm(1e6), optax.sgd(0.01)),
    ],
    ids=["constant", "schedule", "injected", "injected schedule", "lr_schedule", "chain"],
)
def test_every_readable_optimizer_runs_at_the_test_rates(make):
    r = lr_find(Quadratic(make=make), BATCHES, **RANGE)
    assert r.lrs == pytest.approx(np.geomspace(1e-3, 1.0, 16), rel=1e-12)
    np.testing.assert_allclose(r.step_losses, sgd_losses(1.0, r.lrs), rtol=2e-5)
    assert r.unapplied_steps == 0 and not r.diverged


def test_adam_update_is_rescaled_exactly():
    """Adam's update is linear in its rate: the test's steps equal optax.adam run at the
    ladder's rates directly (up to float32 rounding of the ratio)."""
    r = lr_find(Quadratic(make=lambda: optax.adamw(3e-4, weight_decay=0.1)), BATCHES, **RANGE)
    lrs = ladder(1e-3, 1.0, 16)
    tx = optax.adamw(lambda i: jnp.asarray(lrs, jnp.float32)[i], weight_decay=0.1)
    w = jnp.ones((4,))
    state, want = tx.init(w), []
    for _ in range(16):
        want.append(float(0.5 * jnp.sum(w**2)))
        u, state = tx.update(w, state, w)
        w = optax.apply_updates(w, u)
    np.testing.assert_allclose(r.step_losses, want, rtol=1e-5)


def test_warmup_from_zero_skips_only_the_first_update_and_says_nothing():
    make = lambda: optax.sgd(optax.warmup_cosine_decay_schedule(0.0, 0.1, 4, 16))  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error", LRFindWarning)
        r = lr_find(Quadratic(make=make), BATCHES, **RANGE)
    assert r.unapplied_steps == 1
    np.testing.assert_allclose(r.step_losses, sgd_losses(1.0, r.lrs, skip_first=True), rtol=2e-5)


def test_a_rate_of_zero_after_the_first_step_warns():
    sched = optax.piecewise_constant_schedule(0.1, {3: 0.0})  # 0 from step 3 on
    with pytest.warns(LRFindWarning, match=r"learning rate of 0 at 13 of the test's steps"):
        r = lr_find(Quadratic(make=lambda: optax.sgd(sched)), BATCHES, **RANGE)
    assert r.unapplied_steps == 13


def state_of(module):
    """Every array of the module's state as host numpy, RNG keys as their data."""

    def host(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.array(x)

    return jax.tree.map(host, nnx.state(module))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_module_is_left_untouched(tmp_path, mode):
    module = Classifier(dropout=0.3, batchnorm=True)
    getattr(module, mode)()
    before, graph = state_of(module), nnx.graphdef(module)
    data = ArrayLoader(toy_data(64), batch_size=8, shuffle=True)
    r = lr_find(module, data, num_steps=20, workdir=tmp_path if mode == "train" else None)
    assert type(module) is Classifier
    assert nnx.graphdef(module) == graph  # same structure, same train/eval mode
    after = state_of(module)
    assert jax.tree.structure(after) == jax.tree.structure(before)
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    # The test ran (BatchNorm statistics and dropout keys moved in the copy, not here), and
    # wrote its plot and nothing else.
    assert len(r.losses) == 20
    if mode == "eval":
        return
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lr_find.png"]
    assert r.plot_path == tmp_path / "lr_find.png"
    assert r.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A second test from the same module sees the same start: the same losses.
    again = lr_find(module, data, num_steps=20)
    np.testing.assert_array_equal(again.step_losses, r.step_losses)


@pytest.mark.parametrize("h", [1.0, 10.0, 100.0])
def test_suggestion_is_where_the_loss_falls_fastest(h):
    """On the quadratic with SGD the loss falls fastest per step around lr = 1/h and rises
    above 2/h; the suggestion lies in [0.1/h, 2/h], a decade and a bit out of the eight the
    default range spans."""
    r = lr_find(Quadratic(h=h), BATCHES)
    assert r.suggestion is not None
    assert 0.1 / h <= r.suggestion <= 2.0 / h, r.suggestion * h
    assert r.suggestion == r.lrs[r.suggestion_index]


def test_stops_right_after_the_step_that_diverged():
    full = lr_find(Quadratic(h=10.0), BATCHES, early_stop_threshold=None, max_lr=100.0)
    stopped = lr_find(Quadratic(h=10.0), BATCHES, max_lr=100.0)
    s = full.losses
    first = next(i for i in range(1, len(s)) if s[i] > 4 * np.min(s[:i]))
    assert stopped.diverged and len(stopped.losses) == first + 1
    np.testing.assert_array_equal(stopped.step_losses, full.step_losses[: first + 1])
    # Without a threshold it runs until the loss is no longer finite, and stops there.
    assert full.diverged and len(full.losses) < 100
    assert not np.isfinite(full.step_losses[-1]) and np.isfinite(full.step_losses[:-1]).all()


def test_suggest_picks_the_steepest_fall_in_log_lr():
    lrs = np.geomspace(1e-6, 1.0, 40)
    losses = 1.0 / (1.0 + np.exp(3 * (np.log10(lrs) + 2)))  # steepest at 1e-2
    assert lrs[suggest(lrs, losses)] == pytest.approx(1e-2, rel=0.4)
    assert suggest(lrs, np.linspace(1, 2, 40)) is None  # never falls
    assert suggest(lrs[:11], losses[:11]) is None  # too few points past the first ten
    losses[20] = np.nan  # non-finite points are left out
    assert suggest(lrs, losses) is not None


def test_no_suggestion_warns():
    rising = Quadratic(make=lambda: optax.sgd(-0.01))  # gradient ascent: the loss only rises
    with pytest.warns(LRFindWarning, match="fell nowhere"):
        r = lr_find(rising, BATCHES, num_steps=20, max_lr=0.1, early_stop_threshold=None)
    assert r.suggestion is None and r.suggestion_index is None
    assert isinstance(r, LRFindResult)


def test_unreadable_optimizer_names_the_fix():
    class Opaque(optax.GradientTransformation):
        def __new__(cls):
            return super().__new__(cls, lambda p: (), lambda g, s, p=None: (g, s))

    with pytest.raises(nnxfit.ConfigError, match="inject_hyperparams.*lr_schedule"):
        lr_find(Quadratic(make=Opaque), BATCHES, num_steps=5)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"max_lr": 1e-8}, "must be above min_lr"),
        ({"min_lr": 0.0}, "min_lr must be a number > 0"),
        ({"num_steps": 1}, "num_steps must be an integer >= 2"),
        ({"early_stop_threshold": 0.5}, "early_stop_threshold"),
        ({"workdir": None, "max_steps": 5}, r"Trainer options \['max_steps'\]"),
    ],
)
def test_bad_options(kw, match):
    with pytest.raises(nnxfit.ConfigError, match=match):
        lr_find(Quadratic(), BATCHES, **kw)
