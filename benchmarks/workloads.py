"""Three workloads that look like users' models, and every contender's loop over them.

* ``mlp``: the digits MLP of ``../shared/bench/peers.py`` (hidden 128, batch 64): overhead-bound.
* ``cnn``: ``examples/digits_cnn.py``'s CNN (two conv blocks with BatchNorm, a Dropout head) on
  the digits as 8x8x1 images, batch 64.
* ``lm``: ``examples/char_lm.py``'s causal transformer (2 blocks, dim 64, 4 heads, context 64)
  on bytes of the standard library's source, batch 32, the first 64 batches of windows.

Every contender trains the same model (Keras: its own equivalent) with AdamW (lr 1e-3, weight
decay 1e-4, eps 1e-8), softmax cross-entropy, the same batches in the same order (no shuffle).
Hand-written loops return ``run(n)``: it trains ``n`` more steps and waits for the device.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import jax
import numpy as np
import optax
from flax import nnx

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.append(ROOT)  # PYTHONPATH wins
sys.path.append(os.path.join(ROOT, "examples"))

from common import MLP, Stopwatch, default_callback_kwargs, digits, optional  # noqa: E402

import nnxfit  # noqa: E402
from nnxfit.data import ArrayLoader  # noqa: E402

LR, WEIGHT_DECAY, EPS = 1e-3, 1e-4, 1e-8


def optimizer() -> optax.GradientTransformation:
    return optax.adamw(LR, eps=EPS, weight_decay=WEIGHT_DECAY)


def loss_fn(net, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(net(x), y).mean()


@dataclass
class Workload:
    name: str
    title: str
    x: np.ndarray
    y: np.ndarray
    batch: int
    steps: int  # N: steps timed per measurement (full run)
    quick_steps: int
    make_net: Callable[[nnx.Rngs], nnx.Module]
    ckpt_every: int  # ModelCheckpoint(every_n_steps=...) of the "all callbacks" contender

    @property
    def batches(self) -> list[tuple[np.ndarray, np.ndarray]]:
        b = self.batch
        return [(self.x[i * b : (i + 1) * b], self.y[i * b : (i + 1) * b]) for i in range(self.nb)]

    @property
    def nb(self) -> int:
        return len(self.x) // self.batch


def _whole(x, y, batch):
    n = len(x) // batch * batch
    return x[:n], y[:n]


def mlp() -> Workload:
    x, y = _whole(*digits(), 64)
    return Workload(
        "mlp", "digits MLP h128, batch 64", x, y, 64, 3000, 640,
        lambda rngs: MLP(64, 128, 10, rngs=rngs), 1000,
    )  # fmt: skip


def cnn() -> Workload:
    from digits_cnn import CNN

    x, y = digits()
    x, y = _whole(x.reshape(-1, 8, 8, 1), y, 64)
    return Workload(
        "cnn", "digits CNN (BatchNorm, Dropout), batch 64", x, y, 64, 600, 128,
        lambda rngs: CNN(rngs=rngs), 200,
    )  # fmt: skip


def lm() -> Workload:
    import char_lm

    x, y = char_lm.windows(char_lm.corpus())
    x, y = x[: 64 * 32], y[: 64 * 32]
    return Workload(
        "lm", "char transformer LM (2 blocks, dim 64, ctx 64), batch 32", x, y, 32, 192, 64,
        lambda rngs: char_lm.CharLM(rngs=rngs), 64,
    )  # fmt: skip


WORKLOADS = {"mlp": mlp, "cnn": cnn, "lm": lm}


def net_and_optimizer(w: Workload, seed: int = 0):
    net = w.make_net(nnx.Rngs(seed))
    net.train()  # BatchNorm batch statistics, Dropout on
    return net, nnx.Optimizer(net, optimizer(), wrt=nnx.Param)


# ------------------------------------------------------------------ hand-written loops ---
def hand_jit(w: Workload) -> Callable[[int], None]:
    """A: ``jax.jit`` over the split state, donated: the practical limit of one step per call."""
    gdef, state = nnx.split(net_and_optimizer(w))

    def step(state, x, y):
        net, opt = nnx.merge(gdef, state)
        loss, g = nnx.value_and_grad(loss_fn)(net, x, y)
        opt.update(net, g)
        return nnx.state((net, opt)), loss

    step = jax.jit(step, donate_argnums=0)
    holder, batches = [state, 0], w.batches

    def run(n: int) -> None:
        s, i0, loss = holder[0], holder[1], None
        for i in range(i0, i0 + n):
            x, y = batches[i % w.nb]
            s, loss = step(s, x, y)
        jax.block_until_ready(loss)
        holder[0], holder[1] = s, i0 + n

    return run


def hand_scan(w: Workload, k: int = 32) -> Callable[[int], None]:
    """C: a ``lax.scan`` of ``k`` steps per call over stacked batches (``n`` rounded to k)."""
    gdef, state = nnx.split(net_and_optimizer(w))

    def one(state, xy):
        net, opt = nnx.merge(gdef, state)
        loss, g = nnx.value_and_grad(loss_fn)(net, *xy)
        opt.update(net, g)
        return nnx.state((net, opt)), loss

    multi = jax.jit(lambda s, xs, ys: jax.lax.scan(one, s, (xs, ys)), donate_argnums=0)
    xs = np.stack([b[0] for b in w.batches])
    ys = np.stack([b[1] for b in w.batches])
    holder = [state, 0]

    def run(n: int) -> None:
        s, c0, losses = holder[0], holder[1], None
        for c in range(c0, c0 + max(1, n // k)):
            ii = np.arange(c * k, (c + 1) * k) % w.nb
            s, losses = multi(s, xs[ii], ys[ii])
        jax.block_until_ready(losses)
        holder[0], holder[1] = s, c0 + max(1, n // k)

    return run


def nnx_jit(w: Workload) -> Callable[[int], None]:
    """B: the ``@nnx.jit`` train step of the Flax guides."""
    net, opt = net_and_optimizer(w)

    @nnx.jit
    def train_step(net, opt, x, y):
        loss, g = nnx.value_and_grad(loss_fn)(net, x, y)
        opt.update(net, g)
        return loss

    holder, batches = [0], w.batches

    def run(n: int) -> None:
        loss = None
        for i in range(holder[0], holder[0] + n):
            x, y = batches[i % w.nb]
            loss = train_step(net, opt, x, y)
        jax.block_until_ready(loss)
        holder[0] += n

    return run


# ------------------------------------------------------------------------------ peers ---
def keras_available() -> str | None:
    """Why Keras cannot run here, or None."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    try:
        import keras
    except ImportError:
        return "keras is not installed (pip install -e '.[bench]')"
    if keras.backend.backend() != "jax":
        return f"keras runs on {keras.backend.backend()!r}, not jax (set KERAS_BACKEND=jax)"
    return None


def keras_model(w: Workload):
    """The workload's model written in Keras 3 (same layers, sizes and defaults as far as
    Keras has them)."""
    import keras
    from keras import layers

    if w.name == "mlp":
        return keras.Sequential(
            [
                keras.Input((64,)),
                layers.Dense(128, activation="relu"),
                layers.Dense(128, activation="relu"),
                layers.Dense(10),
            ]
        )
    if w.name == "cnn":
        return keras.Sequential(
            [
                keras.Input((8, 8, 1)),
                layers.Conv2D(32, 3, padding="same"),
                layers.BatchNormalization(momentum=0.99, epsilon=1e-5),
                layers.ReLU(),
                layers.AveragePooling2D(2),
                layers.Conv2D(64, 3, padding="same"),
                layers.BatchNormalization(momentum=0.99, epsilon=1e-5),
                layers.ReLU(),
                layers.AveragePooling2D(2),
                layers.Flatten(),
                layers.Dense(128, activation="relu"),
                layers.Dropout(0.3),
                layers.Dense(10),
            ]
        )
    import char_lm

    dim, heads, seq = 64, 4, char_lm.SEQ

    class Embed(layers.Layer):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.tokens = layers.Embedding(char_lm.VOCAB, dim)
            self.positions = layers.Embedding(seq, dim)

        def call(self, ids):
            return self.tokens(ids) + self.positions(keras.ops.arange(keras.ops.shape(ids)[1]))

    ids = keras.Input((seq,), dtype="int32")
    x = Embed()(ids)
    for _ in range(2):
        h = layers.LayerNormalization(epsilon=1e-6)(x)
        h = layers.MultiHeadAttention(heads, dim // heads)(h, h, use_causal_mask=True)
        x = x + layers.Dropout(0.1)(h)
        h = layers.LayerNormalization(epsilon=1e-6)(x)
        h = layers.Dense(dim)(layers.Dense(4 * dim, activation="gelu")(h))
        x = x + layers.Dropout(0.1)(h)
    out = layers.Dense(char_lm.VOCAB)(layers.LayerNormalization(epsilon=1e-6)(x))
    return keras.Model(ids, out)


def keras_rate(w: Workload, steps: int, spe: int, seconds: float | None = None) -> float:
    """Steps/s of Keras 3 ``fit`` (JAX backend, ``jit_compile=True``): one warm-up fit of an
    epoch (compiles), then a timed fit of whole epochs: ``steps`` worth, or about ``seconds``
    worth as a timed one-epoch fit predicts."""
    import keras

    m = keras_model(w)
    m.compile(
        optimizer=keras.optimizers.AdamW(LR, weight_decay=WEIGHT_DECAY, epsilon=EPS),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=spe,
        jit_compile=True,
    )

    def fit(epochs: int) -> float:
        t = time.perf_counter()
        m.fit(w.x, w.y, batch_size=w.batch, epochs=epochs, verbose=0, shuffle=False)
        return time.perf_counter() - t

    fit(1)
    epochs = max(1, -(-steps // w.nb))
    if seconds is not None:
        epochs = max(1, round(seconds / fit(1)))
    return epochs * w.nb / fit(epochs)


def tunix_available() -> str | None:
    try:
        from tunix.sft import peft_trainer  # noqa: F401
    except ImportError as e:
        return f"google-tunix is not importable ({e}; pip install -e '.[bench]')"
    return None


def tunix_seconds(w: Workload, steps: int) -> float:
    """Wall time of one Tunix ``PeftTrainer.train`` of ``steps`` steps (defaults, no eval, no
    progress bar), compile included, until the device is done."""
    from tunix.sft import peft_trainer

    net, _ = net_and_optimizer(w)
    cfg = peft_trainer.TrainingConfig(
        eval_every_n_steps=10**9, max_steps=steps, pbar_description=None
    )
    tr = peft_trainer.PeftTrainer(net, optimizer(), cfg).with_loss_fn(loss_fn)
    batches = w.batches
    data = [{"x": batches[i % w.nb][0], "y": batches[i % w.nb][1]} for i in range(steps + 1)]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        t = time.perf_counter()
        tr.train(data)
        jax.block_until_ready(nnx.state(net))
        return time.perf_counter() - t


# ------------------------------------------------------------------------------ nnxfit ---
class NetModule(nnxfit.TrainModule):
    """Any workload's net as a TrainModule: the same loss and optimizer as the others."""

    def __init__(self, net: nnx.Module):
        self.net = net

    def __call__(self, x):
        return self.net(x)

    def training_step(self, batch):
        x, y = batch
        return loss_fn(self.net, x, y)

    def configure_optimizers(self):
        return optimizer()


def all_callbacks(w: Workload) -> tuple[Callable[[], list], list[str]]:
    """NaNGuard + GradNormMonitor + ModelCheckpoint(every_n_steps) + EMA, as far as they exist
    (EMA is another issue's: skipped, with a note, until ``nnxfit.callbacks.EMA`` exists)."""
    from nnxfit.callbacks.checkpoint import ModelCheckpoint
    from nnxfit.callbacks.grad_norm import GradNormMonitor
    from nnxfit.callbacks.nan_guard import NaNGuard

    ema = optional("nnxfit.callbacks", "EMA")
    names = ["NaNGuard", "GradNormMonitor", f"ModelCheckpoint(every_n_steps={w.ckpt_every})"]
    names.append("EMA" if ema is not None else "EMA skipped: nnxfit.callbacks.EMA does not exist")

    def make():
        cbs = [NaNGuard(), GradNormMonitor(), ModelCheckpoint(every_n_steps=w.ckpt_every)]
        return cbs + ([ema()] if ema is not None else [])

    return make, names


def _fit(w: Workload, *, spe, callbacks, trainer_kwargs=None, **limits):
    """One quiet fit of a fresh module with the default callbacks (non-terminal progress
    line, CSV log) in a temporary workdir. Returns (trainer, seconds until the device is done,
    compile included)."""
    module = NetModule(net_and_optimizer(w)[0])
    with tempfile.TemporaryDirectory() as d:
        kw = default_callback_kwargs(d)[0]
        kw.update(trainer_kwargs or {})
        tr = nnxfit.Trainer(steps_per_execution=spe, callbacks=callbacks, **limits, **kw)
        loader = ArrayLoader((w.x, w.y), batch_size=w.batch, shuffle=False)
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # GradNormMonitor's range warnings
            t = time.perf_counter()
            tr.fit(module, loader)
            jax.block_until_ready(nnx.state(module))
            return tr, time.perf_counter() - t


def nnxfit_window_rate(w: Workload, steps: int, spe: int, callbacks=list, **kw) -> float:
    """Steps/s inside one fit: from the end of its first epoch (compiled, device done) to the
    end of its last, over whole epochs of at least ``steps`` steps (``common.Stopwatch``)."""
    sw = Stopwatch()
    _fit(w, spe=spe, callbacks=[*callbacks(), sw], max_epochs=1 + -(-steps // w.nb), **kw)
    return sw.rate


def nnxfit_fit_seconds(w: Workload, steps: int, spe: int, callbacks=list, **kw) -> float:
    """Wall time of a fit of ``steps`` steps, compile included (the difference method)."""
    return _fit(w, spe=spe, callbacks=callbacks(), max_steps=steps, **kw)[1]
