"""Shared workload of the benchmarks: an MLP on scikit-learn's digits, trained by AdamW.

The hand-written contenders are the loops of ``../shared/bench/peers.py`` (A: ``jax.jit`` over
split state with donated buffers, B: ``@nnx.jit``, C: a ``lax.scan`` of K steps per call), so
ratios here compare with the peer table. Each returns a ``run(n)`` closure that trains ``n``
steps and blocks until the device is done; its first call compiles.
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

import jax
import numpy as np
import optax
from flax import nnx

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # PYTHONPATH wins

import nnxfit  # noqa: E402
from nnxfit.data import ArrayLoader  # noqa: E402


def digits(tile: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Digits (1797 x 64, scaled to [0, 1]), repeated ``tile`` times for longer epochs."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int32)
    return np.tile(x, (tile, 1)), np.tile(y, tile)


def full_batches(x, y, batch: int) -> tuple[np.ndarray, np.ndarray, list]:
    """The data cut to whole batches (as peers.py does) and the list of batches in order."""
    nb = len(x) // batch
    x, y = x[: nb * batch], y[: nb * batch]
    return (
        x,
        y,
        [(x[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch]) for i in range(nb)],
    )


class MLP(nnx.Module):
    """peers.py's MLP, unchanged, so that the hand-written loops flatten the same state."""

    def __init__(self, din: int, dh: int, dout: int, *, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(din, dh, rngs=rngs)
        self.l2 = nnx.Linear(dh, dh, rngs=rngs)
        self.l3 = nnx.Linear(dh, dout, rngs=rngs)

    def __call__(self, x):
        return self.l3(nnx.relu(self.l2(nnx.relu(self.l1(x)))))


def loss_fn(model, x, y):
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits


def num_params(model: nnx.Module) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


# ------------------------------------------------------------------ hand-written loops ---
def hand_jit(batches, hidden: int, lr: float = 1e-3) -> Callable[[int], None]:
    """A: the practical limit: jax.jit over split state, donated buffers."""
    model = MLP(64, hidden, 10, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adamw(lr), wrt=nnx.Param)
    gdef, state = nnx.split((model, opt))

    def step(state, x, y):
        m, o = nnx.merge(gdef, state)
        (loss, _), g = nnx.value_and_grad(loss_fn, has_aux=True)(m, x, y)
        o.update(m, g)
        return nnx.state((m, o)), loss

    step = jax.jit(step, donate_argnums=0)
    holder, nb = [state], len(batches)

    def run(n: int) -> None:
        s, loss = holder[0], None
        for i in range(n):
            x, y = batches[i % nb]
            s, loss = step(s, x, y)
        jax.block_until_ready(loss)
        holder[0] = s

    return run


def nnx_jit(batches, hidden: int) -> Callable[[int], None]:
    """B: the ``@nnx.jit`` train step of the classic tutorials."""
    model = MLP(64, hidden, 10, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, opt, x, y):
        (loss, _), g = nnx.value_and_grad(loss_fn, has_aux=True)(model, x, y)
        opt.update(model, g)
        return loss

    nb = len(batches)

    def run(n: int) -> None:
        loss = None
        for i in range(n):
            x, y = batches[i % nb]
            loss = train_step(model, opt, x, y)
        jax.block_until_ready(loss)

    return run


def hand_scan(batches, hidden: int, k: int = 32) -> Callable[[int], None]:
    """C: a hand-written ``lax.scan`` of ``k`` steps per call (``n`` rounded down to k)."""
    model = MLP(64, hidden, 10, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
    gdef, state = nnx.split((model, opt))

    def one(state, xy):
        m, o = nnx.merge(gdef, state)
        (loss, _), g = nnx.value_and_grad(loss_fn, has_aux=True)(m, *xy)
        o.update(m, g)
        return nnx.state((m, o)), loss

    multi = jax.jit(lambda s, xs, ys: jax.lax.scan(one, s, (xs, ys)), donate_argnums=0)
    allx = np.stack([b[0] for b in batches])
    ally = np.stack([b[1] for b in batches])
    nb = len(batches)
    holder = [state, 0]

    def run(n: int) -> None:
        s, c0, losses = holder[0], holder[1], None
        for c in range(n // k):
            ii = np.arange((c0 + c) * k, (c0 + c + 1) * k) % nb
            s, losses = multi(s, allx[ii], ally[ii])
        jax.block_until_ready(losses)
        holder[0], holder[1] = s, c0 + n // k

    return run


def keras_fit(x, y, batch: int, hidden: int, steps: int, spe: int) -> float | None:
    """D: Keras 3 ``fit`` on the JAX backend, steps/s after a warm-up epoch; None without
    keras (it is not a dependency of nnxfit)."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    try:
        import keras
    except ImportError:
        return None
    if keras.backend.backend() != "jax":
        return None
    m = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(hidden, activation="relu"),
            keras.layers.Dense(hidden, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    m.compile(
        optimizer=keras.optimizers.AdamW(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=spe,
        jit_compile=True,
    )
    nb = len(x) // batch
    epochs = max(1, steps // nb)
    m.fit(x, y, batch_size=batch, epochs=1, verbose=0, shuffle=False)
    t = time.perf_counter()
    m.fit(x, y, batch_size=batch, epochs=epochs, verbose=0, shuffle=False)
    return epochs * nb / (time.perf_counter() - t)


# ------------------------------------------------------------------------------ nnxfit ---
class DigitsModule(nnxfit.TrainModule):
    def __init__(self, hidden: int, seed: int = 0, lr: float = 1e-3):
        self.net = MLP(64, hidden, 10, rngs=nnx.Rngs(seed))
        self.lr = lr

    def __call__(self, x):
        return self.net(x)

    def training_step(self, batch):
        x, y = batch
        return loss_fn(self.net, x, y)[0]

    def configure_optimizers(self):
        return optax.adamw(self.lr)


def optional(module: str, name: str):
    """``module.name`` when that nnxfit module exists yet, else None."""
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def rss_now_bytes() -> int:
    """This process's resident memory now (``VmRSS``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss_bytes() -> int:
    """This process's peak resident memory (``VmHWM``). Not ``getrusage``'s ``ru_maxrss``:
    Linux keeps that across ``exec``, so a child started by a large parent (``peers.py`` with
    Keras and Tunix loaded, ~950 MiB) reported the parent's peak as its own."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def default_callback_kwargs(workdir: str) -> tuple[dict, list[str]]:
    """Trainer kwargs that turn on the default callbacks (progress bar in non-terminal mode,
    CSV logging) as far as they exist, and the names of those that do."""
    from rich.console import Console

    kw: dict = {"progress_bar": False}
    names = []
    if optional("nnxfit.callbacks.progress", "ProgressBar") is not None:
        kw.update(progress_bar=True, console=Console(file=io.StringIO(), force_terminal=False))
        names.append("ProgressBar(non-terminal)")
    if optional("nnxfit.callbacks.csv_logger", "CSVLogger") is not None:
        kw["workdir"] = workdir
        names.append("CSVLogger")
    return kw, names


class _EmulatedGuard(nnxfit.Callback):
    """Stands in for NaNGuard + GradNormMonitor until they exist: asks the step for what they
    ask (finite check, halt on non-finite, grad norm) and does nothing on the host."""

    step_features = frozenset({"finite", "halt_on_nonfinite", "grad_norm"})


def guard_callbacks() -> tuple[list, str]:
    """``[NaNGuard(), GradNormMonitor()]``, or an emulation while they are not written."""
    nan_guard = optional("nnxfit.callbacks.nan_guard", "NaNGuard")
    grad_norm = optional("nnxfit.callbacks.grad_norm", "GradNormMonitor")
    if nan_guard is not None and grad_norm is not None:
        return [nan_guard(), grad_norm()], "NaNGuard+GradNormMonitor"
    return [_EmulatedGuard()], "emulated guard (finite, halt_on_nonfinite, grad_norm)"


class Stopwatch(nnxfit.Callback):
    """Times a fit's steady state: from the end of its first epoch (compilation done) to the
    end of its last, both after the device has finished. Only epoch-end hooks: it costs
    one Python call per epoch and two syncs per fit."""

    order = 10**9  # last: the window holds what every other callback does at an epoch end
    records_only = True  # lets the next epoch start early, as in real fits

    def __init__(self):
        self.t0 = self.t1 = None
        self.s0 = self.s1 = 0
        self.cpu0 = self.cpu1 = (0.0, 0.0)  # CPU seconds: this process, its child processes
        self.loop0 = self.loop1 = 0.0  # CPU seconds of the thread running the loop

    def on_train_epoch_end(self, trainer, module, epoch, logs):
        if epoch == 0 or epoch + 1 == trainer.max_epochs:
            jax.block_until_ready(trainer.train_state())
            t = time.perf_counter()
            cpu, loop = (time.process_time(), children_cpu()), time.thread_time()
            # The device has done every step dispatched so far, which may run ahead of the
            # epoch whose end this is (the Trainer's lookahead).
            if epoch == 0:
                self.t0, self.s0, self.cpu0, self.loop0 = t, trainer.dispatch_step, cpu, loop
            else:
                self.t1, self.s1, self.cpu1, self.loop1 = t, trainer.dispatch_step, cpu, loop

    def cpu_per_step(self) -> tuple[float, float]:
        """CPU microseconds per step in the window: this process (the loop, XLA's threads, the
        loggers' threads), and its child processes (the trackers' processes and theirs)."""
        n = self.s1 - self.s0
        return tuple((b - a) / n * 1e6 for a, b in zip(self.cpu0, self.cpu1, strict=True))

    def loop_cpu_per_step(self) -> float:
        """CPU microseconds per step of the thread that runs the loop (and dispatches)."""
        return (self.loop1 - self.loop0) / (self.s1 - self.s0) * 1e6

    @property
    def rate(self) -> float:
        return (self.s1 - self.s0) / (self.t1 - self.t0)


def children_cpu() -> float:
    """CPU seconds (user + system) of the live descendants of this process, from /proc (0 where
    there is none): what the trackers' processes spend, which no rusage of ours counts until
    they are waited for."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total, todo = 0.0, [os.getpid()]
    while todo:
        pid = todo.pop()
        try:
            kids = []
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    kids += [int(k) for k in f.read().split()]
        except OSError:
            continue
        for kid in kids:
            try:
                with open(f"/proc/{kid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
            except (OSError, IndexError, ValueError):
                continue
            todo.append(kid)
    return total


def _timed_fit(x, y, *, batch, spe, callbacks, defaults, trainer_kwargs, **limits) -> float:
    """Seconds of one quiet ``Trainer.fit`` of a fresh ``DigitsModule``, compile included, until
    the device is done. ``limits``: ``max_epochs`` / ``max_steps``; ``hidden`` for the module."""
    module = DigitsModule(limits.pop("hidden"))
    with tempfile.TemporaryDirectory() as d:
        kw = default_callback_kwargs(d)[0] if defaults else {"progress_bar": False}
        kw.update(trainer_kwargs or {})
        tr = nnxfit.Trainer(steps_per_execution=spe, callbacks=callbacks, **limits, **kw)
        loader = ArrayLoader((x, y), batch_size=batch, shuffle=True, seed=0)
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # GradNormMonitor's range warnings
            t = time.perf_counter()
            tr.fit(module, loader)
            jax.block_until_ready(nnx.state(module))
            return time.perf_counter() - t


def nnxfit_steady_rate(
    x,
    y,
    *,
    batch: int,
    hidden: int,
    steps: int,
    spe: int,
    callbacks: Callable[[], list] = list,
    defaults: bool = True,
    trainer_kwargs: dict | None = None,
    window: bool | str = False,
):
    """Steps/s of ``Trainer.fit`` in steady state: one warm-up epoch, then at least ``steps``
    steps in whole epochs (so no tail program compiles inside the timed window). With
    ``window=True``, returns ``(rate, first_step, last_step, seconds)`` of the window; with
    ``window="cpu"``, ``(rate, cpu_us_per_step, children_cpu_us_per_step)``."""
    sw = Stopwatch()
    _timed_fit(
        x, y, batch=batch, spe=spe, callbacks=[*callbacks(), sw], defaults=defaults,
        trainer_kwargs=trainer_kwargs, hidden=hidden, max_epochs=1 + -(-steps // (len(x) // batch)),
    )  # fmt: skip
    if window == "cpu":
        return sw.rate, *sw.cpu_per_step()
    if window:
        return sw.rate, sw.s0, sw.s1, sw.t1 - sw.t0
    return sw.rate


def nnxfit_fit_seconds(
    x,
    y,
    *,
    batch: int,
    hidden: int,
    steps: int,
    spe: int,
    callbacks: Callable[[], list] = list,
    defaults: bool = True,
    trainer_kwargs: dict | None = None,
) -> float:
    """Wall time of one ``Trainer.fit`` of ``steps`` steps, from a fresh module (compile
    included) to the device being done."""
    return _timed_fit(
        x, y, batch=batch, spe=spe, callbacks=callbacks(), defaults=defaults,
        trainer_kwargs=trainer_kwargs, hidden=hidden, max_steps=steps,
    )  # fmt: skip


# ----------------------------------------------------------------------------- loggers ---
class _TrackersReady(nnxfit.Callback):
    """Holds the end of the first epoch until the background loggers have started their runs
    (MLflow's store opened, wandb's run initialised), so that the timed window measures what
    they cost per step, not their start-up (seconds, once per fit, on the loggers' thread)."""

    order = 10**9 - 1  # just before the Stopwatch stamps the start of the window
    records_only = True

    def __init__(self, loggers):
        self.loggers = loggers

    def on_train_epoch_end(self, trainer, module, epoch, logs):
        if epoch == 0:
            for logger in self.loggers:
                logger.state_dict()  # a background writer's state waits for its open


def tracker_callbacks(root: str) -> tuple[Callable[[], list] | None, str]:
    """A factory of every logger nnxfit has, each writing into a fresh folder under ``root``
    (MLflow into one SQLite store made up front: a new store's schema migration is a one-off
    cost, not a per-step one), and their names; (None, reason) when a client is missing."""
    from nnxfit.callbacks import CSVLogger, MLflowLogger, TensorBoardLogger, WandbLogger
    from nnxfit.errors import ConfigError

    try:
        MLflowLogger(), WandbLogger()
    except ConfigError as e:
        return None, str(e)
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{os.path.join(root, 'mlflow.db')}"
    MlflowClient(uri).search_experiments()  # creates the store
    count = [0]

    def make() -> list:
        count[0] += 1
        d = os.path.join(root, f"fit{count[0]}")
        loggers = [
            CSVLogger(os.path.join(d, "metrics.csv")),
            TensorBoardLogger(os.path.join(d, "tensorboard")),
            MLflowLogger(tracking_uri=uri),
            WandbLogger(mode="offline", dir=d),
        ]
        return [*loggers, _TrackersReady(loggers)]

    return make, "CSVLogger, TensorBoardLogger, MLflowLogger (SQLite), WandbLogger (offline)"
