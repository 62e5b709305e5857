"""Convolutions inside the steps_per_execution scan run in XLA:CPU's fast order, and
``Trainer(scan_unroll=...)`` changes how the scan runs, never what it computes."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import nnxfit
from nnxfit.data import ArrayLoader
from nnxfit.errors import ConfigError
from nnxfit.loop_convs import CONV, canonical_conv, canonical_convs, is_canonical


class TinyCNN(nnxfit.TrainModule):
    def __init__(self, seed=0):
        rngs = nnx.Rngs(seed)
        self.conv1 = nnx.Conv(1, 4, kernel_size=(3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.conv2 = nnx.Conv(4, 4, kernel_size=(3, 3), rngs=rngs)
        self.out = nnx.Linear(4 * 4 * 4, 3, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.bn(self.conv1(x)))
        h = nnx.avg_pool(nnx.relu(self.conv2(h)), window_shape=(2, 2), strides=(2, 2))
        return self.out(h.reshape(h.shape[0], -1))

    def training_step(self, batch):
        x, y = batch
        return optax.softmax_cross_entropy_with_integer_labels(self(x), y).mean()

    def configure_optimizers(self):
        # Not Adam: BatchNorm cancels conv1's bias, whose gradient is then rounding noise
        # that Adam would scale up to +-lr, in any two differently compiled programs.
        return optax.sgd(0.1)


def images(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8, 8, 1)).astype(np.float32)
    return x, (x.sum(axis=(1, 2, 3)) > 0).astype(np.int32)


def conv_params(jaxpr) -> list[dict]:
    """The params of every convolution in ``jaxpr``, at any depth."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive is CONV:
            out.append(eqn.params)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            out += conv_params(sub)
    return out


def kernel_grads(xs, k):
    """A scan whose body holds a convolution's kernel gradient (in jax's f01b_i01o order)."""

    def loss(k, x, c):
        dn = ("NHWC", "HWIO", "NHWC")
        return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=dn).sum() * c

    def body(c, x):
        g = jax.grad(loss)(k, x, c)
        return c + g.mean(), g

    return jax.lax.scan(body, jnp.float32(1.0), xs)


def test_canonical_conv_equals_the_conv_it_replaces():
    rng = np.random.default_rng(0)
    lhs = jnp.asarray(rng.normal(size=(2, 5, 6, 7)), jnp.float32)  # (feature, h, w, batch)
    rhs = jnp.asarray(rng.normal(size=(3, 3, 4, 2)), jnp.float32)  # (h, w, out, in)
    dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("CHWN", "HWOI", "WCNH"))
    kw = dict(
        window_strides=(1, 2), padding=((1, 1), (0, 1)), lhs_dilation=(1, 1),
        rhs_dilation=(1, 1), dimension_numbers=dn, feature_group_count=1, batch_group_count=1,
        precision=None, preferred_element_type=None,
    )  # fmt: skip
    want = jax.lax.conv_general_dilated(lhs, rhs, **{k: kw[k] for k in kw if "group" not in k})
    got = canonical_conv(lhs, rhs, **kw, out_sharding=None)
    assert not is_canonical({"dimension_numbers": dn})
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_canonical_convs_rewrites_convolutions_inside_a_scan():
    xs = jnp.asarray(np.random.default_rng(1).normal(size=(3, 2, 6, 6, 3)), jnp.float32)
    k = jnp.ones((3, 3, 3, 4), jnp.float32) * 0.1
    before = conv_params(jax.make_jaxpr(kernel_grads)(xs, k).jaxpr)
    after = conv_params(jax.make_jaxpr(canonical_convs(kernel_grads))(xs, k).jaxpr)
    assert any(not is_canonical(p) for p in before)  # what jax's transpose rule emits
    assert after and all(is_canonical(p) for p in after)
    for a, b in zip(
        jax.tree.leaves(jax.jit(kernel_grads)(xs, k)),
        jax.tree.leaves(jax.jit(canonical_convs(kernel_grads))(xs, k)),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_canonical_convs_keeps_programs_without_convolutions():
    def f(x, n):
        return jax.lax.fori_loop(0, n, lambda i, c: jnp.sin(c) @ c, x), {"n": n}

    x = jnp.eye(3)
    got = jax.jit(canonical_convs(f))(x, 4)
    want = jax.jit(f)(x, 4)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))


@functools.cache
def fitted(spe, unroll=1):
    """The parameters after 12 steps (one epoch of 8 batches, then 4), and the Trainer."""
    x, y = images()
    module = TinyCNN()
    t = nnxfit.Trainer(
        max_steps=12, progress_bar=False, steps_per_execution=spe, scan_unroll=unroll
    )
    t.fit(module, ArrayLoader((x, y), 8))
    return [np.asarray(a) for a in jax.tree.leaves(nnx.state(module, nnx.Param))], t


def test_scanned_cnn_program_has_only_canonical_convolutions():
    _, t = fitted(4)
    x, y = images()
    batch = [np.stack([x[:8]] * 4), np.stack([y[:8]] * 4)]
    # Lowered, not compiled: the dimension numbers XLA gets (it keeps them inside a loop).
    text = t.programs.train_multi.lower(t.carry.leaves, batch).as_text()
    orders = set(re.findall(r"dim_numbers = (\[.*?\]x\[.*?\]->\[.*?\])", text))
    # NHWC / HWIO / NHWC only; the gradients' [f, 0, 1, b]x[i, 0, 1, o] and
    # [b, 0, 1, f]x[0, 1, o, i] orders are gone.
    assert orders == {"[b, 0, 1, f]x[0, 1, i, o]->[b, 0, 1, f]"}, orders


def test_scanned_cnn_trains_like_single_steps():
    for a, b in zip(fitted(1)[0], fitted(4)[0], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("unroll", [True, 3])
def test_scan_unroll_trains_like_the_scan(unroll):
    unrolled, t = fitted(4, unroll)
    assert t.scan_unroll == unroll
    for a, b in zip(fitted(4)[0], unrolled, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [0, -2, 1.5, False, "auto", None])
def test_scan_unroll_validates(bad):
    with pytest.raises(ConfigError, match="scan_unroll must be an integer >= 1"):
        nnxfit.Trainer(max_steps=1, scan_unroll=bad)
