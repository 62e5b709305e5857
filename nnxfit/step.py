"""The pure, jitted functions of a fit: train step, K-step scan, eval step, predict step.

Everything the Trainer runs per step lives here as a plain function of flat lists of
arrays, jitted once and donated. Flat lists (not ``nnx.State``) are what the Trainer passes
across the jit boundary: their flattening happens in C++, which is where nnxfit gains its
edge over a hand-written loop that passes ``nnx.State`` (Python pytree callbacks per call).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nnxfit import averaging, bad_runs, loop_convs, manual_step, spikes
from nnxfit.errors import ConfigError, StepOutputError
from nnxfit.eval_accum import EvalSpec, accumulate, split_outputs
from nnxfit.hyperparams import learning_rate_of
from nnxfit.optimizers import clip_and_norms, learning_rates, named_value_and_grad

FEATURES = frozenset(
    {"grad_norm", "module_grad_norms", "finite", "skip_nonfinite", "halt_on_nonfinite", "lr"}
)
GATES = frozenset({"skip_nonfinite", "halt_on_nonfinite"})  # features that gate the update


class CallKind(StrEnum):
    """Which train program a call runs: one step, or a ``lax.scan`` over stacked steps."""

    SINGLE = "single"
    MULTI = "multi"


@dataclass(frozen=True)
class StepFeatures:
    """What the train step computes besides the loss, for the callbacks that ask for it
    (``Callback.step_features``, by name: ``FEATURES``).

    ``grad_norm``: the global gradient norm, logged. ``module_grad_norms``: one per top-level
    submodule (``grad_norm/<name>``). ``finite``: whether the loss and the gradient are finite,
    with the count of steps that were not and the first of them (``nonfinite_steps``).
    ``on_nonfinite``: what such a step does to the state: ``"skip"`` leaves it untouched,
    ``"halt"`` freezes it from then on (``NaNGuard``); it implies ``finite``. ``lr``: the
    learning rate each step used, logged. ``ema_decay``: keep an exponential moving average
    of the parameters (``averaging.py``; ``EMA``), which validation uses when
    ``ema_validate``. ``spike``: skip (or halt at) steps whose loss or gradient norm spikes
    (``spikes.SpikeSpec``; ``SpikeGuard``), in the same gate as ``on_nonfinite``.

    A callback asks by names (``FEATURES``) or, for the features with values (EMA,
    SpikeGuard), with a ``StepFeatures`` of its own; ``merge`` joins them.
    """

    grad_norm: bool = False
    module_grad_norms: bool = False
    finite: bool = False
    on_nonfinite: str | None = None  # None, "skip" or "halt"
    lr: bool = False
    ema_decay: float | None = None
    ema_validate: bool = False
    spike: spikes.SpikeSpec | None = None
    # NaNGuard("rollback", max_consecutive=K): the step also counts the current run of
    # non-finite steps and notes the step at which one first reached K (``rollback.py``).
    rollback_after: int | None = None

    def __post_init__(self) -> None:
        if self.on_nonfinite not in (None, "skip", "halt"):
            raise ConfigError(
                f"StepFeatures on_nonfinite must be None, 'skip' or 'halt'; got "
                f"{self.on_nonfinite!r}."
            )
        if self.on_nonfinite is not None and not self.finite:
            object.__setattr__(self, "finite", True)  # a gate needs the finite check

    @classmethod
    def from_names(cls, names, owner: str = "a callback") -> StepFeatures:
        """The features named in ``names`` (``FEATURES``); an unknown name is a
        ``ConfigError`` naming ``owner``. ``halt_on_nonfinite`` wins over ``skip_nonfinite``."""
        names = set(names)
        unknown = sorted(map(str, names - FEATURES))
        if unknown:
            raise ConfigError(
                f"{owner} asks the train step for step_features {unknown}, which it does not "
                f"compute; the step features are {sorted(FEATURES)}."
            )
        gate = (
            "halt"
            if "halt_on_nonfinite" in names
            else "skip"
            if "skip_nonfinite" in names
            else None
        )
        return cls(
            grad_norm="grad_norm" in names,
            module_grad_norms="module_grad_norms" in names,
            finite="finite" in names,
            on_nonfinite=gate,
            lr="lr" in names,
        )

    def merge(self, other: StepFeatures, owner: str = "a callback") -> StepFeatures:
        """The features of both; two different EMAs or spike guards are a ``ConfigError``."""
        out = StepFeatures.from_names(self.names | other.names)
        for name in ("ema_decay", "spike", "rollback_after"):
            a, b = getattr(self, name), getattr(other, name)
            if a is not None and b is not None and a != b:
                raise ConfigError(
                    f"{owner} asks the train step for {name}={b!r}, but another callback "
                    f"already asked for {name}={a!r}; a fit keeps one. Keep one callback."
                )
        return dataclasses.replace(
            out,
            ema_decay=self.ema_decay if self.ema_decay is not None else other.ema_decay,
            ema_validate=self.ema_validate or other.ema_validate,
            spike=self.spike if self.spike is not None else other.spike,
            rollback_after=(
                self.rollback_after if self.rollback_after is not None else other.rollback_after
            ),
        )

    @property
    def gates(self) -> bool:
        """A non-finite (``skip`` or ``halt``) or spiking step must not change the state."""
        return self.on_nonfinite is not None or self.spike is not None

    @property
    def halts(self) -> bool:
        return self.on_nonfinite == "halt"

    @property
    def freezes(self) -> bool:
        """A bad step freezes the state from then on: ``halts``, or a halting spike guard."""
        return self.halts or (self.spike is not None and self.spike.halt)

    @property
    def names(self) -> frozenset[str]:
        """The features as the names callbacks use (``FEATURES``)."""
        gate = {"skip": "skip_nonfinite", "halt": "halt_on_nonfinite"}.get(self.on_nonfinite)
        flags = ("grad_norm", "module_grad_norms", "finite", "lr")
        return frozenset({n for n in flags if getattr(self, n)} | ({gate} if gate else set()))

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def without(self, *names: str) -> StepFeatures:
        return dataclasses.replace(self, **{n: False for n in names})


class Carry(NamedTuple):
    """Everything a train step reads and writes. Order matters: params, then rest first."""

    params: Any  # pure State of the trainable variables
    rest: Any  # pure State of every other variable (BatchStat, RNG state, frozen params)
    opt: Any  # optax state
    # State step features keep across steps, next to the optimizer's: "ema" (the average of
    # the params, ``averaging.py``), "spike" (SpikeGuard's ring buffer, ``spikes.py``),
    # "opt_steps" (manual optimization: the nnx.Optimizers' step counts, ``manual_step.py``).
    extra: dict
    step: jax.Array | None  # int32 optimizer steps done; None unless a feature needs it
    # f32[n + 1]: running sums of the n per-step metrics (``Programs.metric_order``) over the
    # current epoch, then the count of steps summed. One buffer, not n + 1: every buffer a
    # jitted call takes and returns costs host time per call.
    acc: jax.Array
    last: dict  # values of the latest step (lr)
    # nonfinite_steps, first_nonfinite_step (int32, -1 = none), only with finite; spike_steps,
    # first_spike_step with a spike guard.
    health: dict


@dataclass(frozen=True)
class StepConfig:
    grad_accum_steps: int = 1
    grad_clip_norm: float | None = None
    precision: str = "float32"
    features: StepFeatures = field(default_factory=StepFeatures)
    lr_fn: Callable | None = None  # schedule(step) -> lr, when the lr is not in the opt state
    # With a non-finite gate: the train programs run ungated, and should a step turn out not
    # finite, the loop re-runs the calls since a copy of the state it kept and undoes that
    # step (``speculation.py``, ``Programs.gated``). Only for small states.
    speculate: bool = False
    # ``unroll`` of the K-step ``lax.scan`` (``Trainer(scan_unroll=...)``): n steps per loop
    # iteration, or True for no loop at all.
    scan_unroll: int | bool = 1
    # Several optimizers or manual optimization (``optimizers.OptimizerSpec``); None for the
    # single automatic optimizer, whose programs stay as they were.
    optimizers: Any = None


RETURN_FORMS = (
    "a scalar loss, (loss, {'metric': value, ...}), or {'loss': loss, 'metric': value, ...}"
)


def split_loss(out: Any) -> tuple[jax.Array, dict]:
    """``training_step``'s return value as ``(loss, metrics)``: a scalar loss, ``(loss,
    metrics)``, or Lightning's dict with a ``"loss"`` key (its other entries are metrics)."""
    if out is None:
        raise StepOutputError(
            f"training_step returned None; it must return the loss: {RETURN_FORMS}. Is a "
            "`return` missing at its end?"
        )
    if isinstance(out, dict):
        if "loss" not in out:
            raise StepOutputError(
                f"training_step returned a dict with keys {sorted(map(str, out))} but no "
                f"'loss'; a dict must hold the loss to minimise under 'loss' (the other "
                f"entries are logged as metrics). It may return {RETURN_FORMS}."
            )
        metrics = {k: v for k, v in out.items() if k != "loss"}
        loss = out["loss"]
    elif isinstance(out, tuple | list):
        if len(out) != 2 or not isinstance(out[1], dict):
            second = f", the second a {type(out[1]).__name__}" if len(out) == 2 else ""
            raise StepOutputError(
                f"training_step returned a {type(out).__name__} of length {len(out)}{second}; "
                f"it must return {RETURN_FORMS}."
            )
        loss, metrics = out
    else:
        loss, metrics = out, {}
    if not hasattr(loss, "shape") and not isinstance(loss, int | float):
        raise StepOutputError(
            f"training_step returned a loss of type {type(loss).__name__}; the loss must be a "
            f"scalar array. It may return {RETURN_FORMS}."
        )
    loss = jnp.asarray(loss)
    if loss.shape != ():
        raise StepOutputError(
            f"training_step returned a loss of shape {loss.shape}; it must be a scalar. "
            "Reduce it, e.g. loss.mean()."
        )
    if not jnp.issubdtype(loss.dtype, jnp.floating):
        raise StepOutputError(f"training_step returned a loss of dtype {loss.dtype}; need a float.")
    return loss, check_metrics(metrics, "training_step")


def split_named_losses(out: Any, names: tuple[str, ...]) -> tuple[dict, dict]:
    """``training_step``'s ``{name: loss}`` or ``({name: loss}, metrics)`` with several
    optimizers, as ``(losses, metrics)``."""
    losses, metrics = out, {}
    if isinstance(out, tuple | list) and len(out) == 2:
        losses, metrics = out
    if not isinstance(losses, dict) or set(losses) != set(names):
        if isinstance(losses, dict):
            got = f"a dict with keys {sorted(map(str, losses))}"
        elif hasattr(losses, "shape"):
            got = f"one array of shape {tuple(losses.shape)}"
        else:
            got = f"a {type(losses).__name__}"
        raise StepOutputError(
            f"training_step must return one loss per optimizer {list(names)}: {{name: loss}} "
            f"or ({{name: loss}}, metrics); it returned {got}."
        )
    out_losses = {}
    for n in names:
        loss = jnp.asarray(losses[n])
        if loss.shape != () or not jnp.issubdtype(loss.dtype, jnp.floating):
            raise StepOutputError(
                f"training_step's loss {n!r} has shape {loss.shape} and dtype {loss.dtype}; "
                "each loss must be a float scalar (reduce it, e.g. loss.mean())."
            )
        out_losses[n] = loss
    return out_losses, check_metrics(metrics, "training_step")


def check_metrics(metrics: Any, where: str) -> dict:
    if not isinstance(metrics, dict):
        raise StepOutputError(
            f"{where} must return a dict of scalars; got {type(metrics).__name__}."
        )
    out = {}
    for k, v in metrics.items():
        v = jnp.asarray(v)
        if v.shape != ():
            raise StepOutputError(
                f"{where} metric {k!r} has shape {v.shape}; metrics must be scalars (take .mean())."
            )
        out[str(k)] = v.astype(jnp.float32)
    return out


def _cast_floats(tree: Any, dtype) -> Any:
    def cast(x):
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(dtype)
        return x

    return jax.tree.map(cast, tree)


def _cast_like(tree: Any, like: Any) -> Any:
    return jax.tree.map(
        lambda x, ref: x.astype(ref.dtype) if x.dtype != ref.dtype else x, tree, like
    )


# What manual_step.py needs of this module's output checks (passed, not imported: this
# module calls it).
OUTPUTS = manual_step.Outputs(split_loss=split_loss, cast_like=_cast_like)

# Leaves up to this many elements are joined for the global gradient norm (one copy of them
# per step; larger leaves get a dot product each, whose overhead is small next to their size).
SMALL_LEAF = 1 << 16


def loss_fn(train_def, trainable, batch_def, precision: str, params, rest, batch, names=()):
    """``training_step``'s loss on ``batch`` (leaves of a ``batch_def`` tree) with the module
    merged from ``params`` and ``rest``; returns ``(loss, (metrics, new rest))``. With the
    ``names`` of several optimizers, the loss is ``{name: loss}``."""
    low = precision == "bfloat16"
    batch = jax.tree.unflatten(batch_def, batch)
    if low:
        # Params and inputs compute in bf16; the f32 master params get the gradients
        # through the cast. Non-trainable state (BatchNorm statistics, which flax updates
        # in f32) keeps its dtype, as Keras keeps normalisation layers in f32.
        params = _cast_floats(params, jnp.bfloat16)
        batch = _cast_floats(batch, jnp.bfloat16)
    module = nnx.merge(train_def, params, rest)
    if names:
        loss, metrics = split_named_losses(module.training_step(batch), names)
        loss = {k: v.astype(jnp.float32) for k, v in loss.items()}
    else:
        loss, metrics = split_loss(module.training_step(batch))
        loss = loss.astype(jnp.float32)
    _, _, new_rest = nnx.split(module, trainable, ...)
    new_rest = _cast_like(nnx.as_pure(new_rest), rest)
    return loss, (metrics, new_rest)


def grads(loss, grad_accum_steps: int, params, rest, batch, vg=None):
    """Loss, metrics, new rest and gradients of one optimizer step (micro-batches summed);
    ``loss(params, rest, batch)`` as ``loss_fn``; ``vg`` its value-and-gradient function
    (default ``jax.value_and_grad``; several optimizers: ``optimizers.named_value_and_grad``)."""
    vg = vg or jax.value_and_grad(loss, has_aux=True)
    if grad_accum_steps == 1:
        (value, (metrics, rest)), g = vg(params, rest, batch)
        return value, metrics, rest, g

    def micro(c, mb):
        rest_c, gsum = c
        (value, (metrics, rest_c)), g = vg(params, rest_c, mb)
        return (rest_c, jax.tree.map(jnp.add, gsum, g)), (value, metrics)

    zeros = jax.tree.map(jnp.zeros_like, params)
    (rest, gsum), (losses, metrics) = jax.lax.scan(micro, (rest, zeros), batch)
    n = jax.tree.leaves(batch)[0].shape[0]
    g = jax.tree.map(lambda x: x / n, gsum)
    return losses.mean(), jax.tree.map(jnp.mean, metrics), rest, g


def metric_names(train_def, trainable, config: StepConfig, batch_def, params, rest, batch):
    """Names the train step logs, in order: ``loss``, ``training_step``'s metrics (found by
    tracing on shapes, never by running it), then the step features' gradient norms.
    ``params``, ``rest`` and ``batch`` (leaves) may be arrays or shapes. With several
    optimizers: ``loss_<name>`` after ``loss``, ``grad_norm_<name>`` after ``grad_norm``."""
    spec = config.optimizers
    b = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in batch]
    if spec is not None and spec.manual:
        out = jax.eval_shape(
            lambda p, r, x: manual_step.metric_shapes(
                train_def, trainable, batch_def, spec, p, r, x, OUTPUTS
            ),
            params,
            rest,
            b,
        )
        return list(dict.fromkeys(["loss", *out]))
    several = spec is not None and spec.several
    loss = functools.partial(
        loss_fn, train_def, trainable, batch_def, config.precision,
        names=spec.names if several else (),
    )  # fmt: skip
    vg = named_value_and_grad(loss, spec) if several else None
    if config.grad_accum_steps > 1:
        b = [jax.ShapeDtypeStruct((1, *s.shape), s.dtype) for s in b]
    out = jax.eval_shape(
        lambda p, r, x: grads(loss, config.grad_accum_steps, p, r, x, vg)[1], params, rest, b
    )
    names = ["loss", *out]
    if config.features.grad_norm:
        names.append("grad_norm")
        if several:
            names += [f"grad_norm_{n}" for n in spec.names]
    if config.features.module_grad_norms:
        names += [f"grad_norm/{k}" for k in params]
    return list(dict.fromkeys(names))


class Programs:
    """The jitted programs of one fit (or of one module outside a fit: ``for_eval``): the
    train step (one step, a K-step scan, their gated versions), the eval and predict steps.
    Built whole from the module's structure, the step config and the carry's layout."""

    def __init__(
        self,
        *,
        train_def,
        eval_def,
        trainable,
        tx,
        config: StepConfig,
        treedef,
        batch_def,
        params_def,
        rest_def,
        metric_order: list[str],
        shardings: list | None = None,
    ):
        self.train_def = train_def
        self.eval_def = eval_def
        self.trainable = trainable
        self.tx = tx
        self.config = config
        self.treedef = treedef  # of Carry
        self.batch_def = batch_def  # treedef of a train batch; the programs take its leaves
        self.params_def, self.rest_def = params_def, rest_def
        self.n_params = params_def.num_leaves
        self.metric_order = list(metric_order)  # names summed into Carry.acc, in order
        self.trace_count = 0  # incremented on every trace of a train program (tests pin this)
        # on_trace(kind, batch_leaves): called while jax traces a train program, i.e. only
        # for a new input signature, so it is free at steady state (compile_watch.py).
        self.on_trace: Callable | None = None
        # On a mesh the train programs return the carry with the shardings it came in with
        # (``placement.py``), so every call hits one compiled program and donation reuses the
        # buffers instead of resharding between steps.
        self.sharded = shardings is not None
        self._jit_kw: dict = {} if shardings is None else {"out_shardings": shardings}
        # Speculating, the train programs run ungated (``StepConfig.speculate``).
        self.train_single, self.train_multi = self._train_jits(None if config.speculate else "cond")
        self._gated: tuple | None = None
        # Eval programs, one per step method, and what each step returns per batch signature
        # (``eval_spec``). ``eval_trace_count`` counts their traces (tests pin this). The sums
        # are not donated: small, and the loop keeps the last few to tell which validation
        # batches the device has finished (``evaluate.py``).
        self.eval_trace_count = 0
        self.eval_batch = jax.jit(functools.partial(self._eval, method="validation_step"))
        self.test_batch = jax.jit(functools.partial(self._eval, method="test_step"))
        self._eval_specs: dict = {}
        self.predict_batch = jax.jit(self._predict)

    @classmethod
    def for_eval(cls, eval_def, trainable, params_def, rest_def) -> Programs:
        """The eval and predict programs of a module outside a fit (no train programs)."""
        return cls(
            train_def=None,
            eval_def=eval_def,
            trainable=trainable,
            tx=None,
            config=StepConfig(),
            treedef=None,
            batch_def=None,
            params_def=params_def,
            rest_def=rest_def,
            metric_order=[],
        )

    def _train_jits(self, gate: str | None) -> tuple:
        """The (single, multi) train programs, jitted and donated, with ``gate``."""
        kw = {"donate_argnums": 0, **self._jit_kw}
        wrap = loop_convs.canonical_convs if loop_convs.wanted() else (lambda f: f)
        return tuple(
            jax.jit(wrap(functools.partial(f, gate=gate)), **kw)
            for f in (self._single, self._multi)
        )

    def train(self, gated: bool = False) -> dict:
        """The train programs by ``CallKind``: as configured, or (``gated``) gating every
        update (after a halt, ``speculation.py``)."""
        single, multi = self.gated()[:2] if gated else (self.train_single, self.train_multi)
        return {CallKind.SINGLE: single, CallKind.MULTI: multi}

    def gated(self) -> tuple:
        """For a speculating config, what ``speculation.Speculation`` needs once a step was
        not finite: (single, multi) programs that gate every update (after a halt), and
        ``skipped(before, after)``. Compiled on first use."""
        if self._gated is None:
            skipped = jax.jit(self._skipped, donate_argnums=(0, 1), **self._jit_kw)
            self._gated = (*self._train_jits("cond"), skipped)
        return self._gated

    # -- train ---------------------------------------------------------------------------
    def loss_fn(self, params, rest, batch):
        spec = self.config.optimizers
        return loss_fn(
            self.train_def,
            self.trainable,
            self.batch_def,
            self.config.precision,
            params,
            rest,
            batch,
            names=spec.names if spec is not None else (),
        )

    def grads(self, params, rest, batch):
        """Loss, metrics, new rest and gradients of one optimizer step (micro-batches summed)."""
        spec = self.config.optimizers
        vg = named_value_and_grad(self.loss_fn, spec) if spec is not None and spec.several else None
        return grads(self.loss_fn, self.config.grad_accum_steps, params, rest, batch, vg)

    def global_norm(self, tree) -> jax.Array:
        """The L2 norm of all leaves. Small leaves go into one vector and one dot product: on
        XLA:CPU a reduction per leaf cost 7-23 % of a small MLP's step, one dot 1-4 %. Not on
        a mesh, where joining differently sharded leaves would gather them."""
        leaves = jax.tree.leaves(tree)
        if self.sharded:
            return optax.tree.norm(tree)
        small = [x.ravel().astype(jnp.float32) for x in leaves if x.size <= SMALL_LEAF]
        total = jnp.zeros((), jnp.float32)
        if small:
            v = jnp.concatenate(small) if len(small) > 1 else small[0]
            total = jnp.dot(v, v)
        for x in leaves:
            if x.size > SMALL_LEAF:
                x = x.astype(jnp.float32)
                total = total + jnp.vdot(x, x)
        return jnp.sqrt(total)

    def one_step(self, c: Carry, batch, gate: str | None = "cond") -> Carry:
        cfg, feats = self.config, self.config.features
        spec = cfg.optimizers
        spike_spec = feats.spike
        if spec is not None and spec.manual:
            # training_step updated the module itself: the gate keeps or drops its result.
            loss, metrics, new = manual_step.run(self, c, batch, OUTPUTS)
            step_logs, gnorm, rest = {"loss": loss, **metrics}, None, new[2]
            new_finite = manual_step.all_finite(new[0]) if feats.finite else None

            def update(t):
                params, opt, new_rest, extra = new
                if feats.ema_decay is not None:
                    ema = averaging.update(t[4]["ema"], params, feats.ema_decay)
                    extra = {**extra, "ema": ema}
                return params, opt, new_rest, extra

        else:
            loss, metrics, rest, g = self.grads(c.params, c.rest, batch)
            step_logs = {"loss": loss, **metrics}
            need_norm = cfg.grad_clip_norm is not None or feats.grad_norm or feats.finite
            need_norm = need_norm or (spike_spec is not None and spike_spec.monitor == "grad_norm")
            several = spec is not None and spec.several
            if several and need_norm:  # each optimizer's gradient clipped by its own norm
                gnorm, g, norms = clip_and_norms(spec, self.global_norm, g, cfg.grad_clip_norm)
                if feats.grad_norm:
                    step_logs.update({f"grad_norm_{n}": v for n, v in norms.items()})
            else:
                gnorm = self.global_norm(g) if need_norm else None
                if cfg.grad_clip_norm is not None:
                    scale = jnp.minimum(1.0, cfg.grad_clip_norm / (gnorm + 1e-12))
                    g = jax.tree.map(lambda x: x * scale.astype(x.dtype), g)
            if feats.grad_norm:
                step_logs["grad_norm"] = gnorm
            if feats.module_grad_norms and isinstance(g, nnx.State):
                for name in g:
                    step_logs[f"grad_norm/{name}"] = self.global_norm(g[name])
            new_finite = None  # the gradient norm's, below

            def update(t):
                params, opt, _, new_rest, extra = t
                updates, opt = self.tx.update(g, opt, params)
                params = optax.apply_updates(params, updates)
                if feats.ema_decay is not None:  # after the optimizer step, in the same gate
                    ema = averaging.update(extra["ema"], params, feats.ema_decay)
                    extra = {**extra, "ema": ema}
                return params, opt, new_rest, extra

        state = (c.params, c.opt, c.rest, rest, c.extra)
        ok = jnp.bool_(True)
        health = c.health
        if feats.finite:
            finite = jnp.isfinite(loss)
            finite = finite & (jnp.isfinite(gnorm) if new_finite is None else new_finite)
            ok = finite
            if feats.halts:
                ok = finite & (health["first_nonfinite_step"] < 0)
        if spike_spec is not None:  # one gate with the finite check
            value = loss if spike_spec.monitor == "loss" else gnorm
            spike = spikes.is_spike(spike_spec, c.extra["spike"], value)
            spike = spike & ok & ~spikes.blocked(spike_spec, health)
            ok = ok & ~spike & ~spikes.blocked(spike_spec, health)
        if gate == "cond" and feats.gates:
            # Decide before updating: selecting between the updated and the old state after
            # the update cost 2.1x the step time of a small MLP with optax.adam on CPU, a cond
            # around the update 1.05x (with inject_hyperparams(adam), ~2x either way).
            params, opt, rest, extra = jax.lax.cond(
                ok, update, lambda t: (t[0], t[1], t[2], t[4]), state
            )
        else:  # no gate, or speculating (``StepConfig.speculate``)
            params, opt, rest, extra = update(state)
        if spike_spec is not None:
            extra = {**extra, "spike": spikes.push(spike_spec, extra["spike"], value, ok)}
            health = {**health, **spikes.count(health, spike, c.step + 1)}
            if spike_spec.rollback_after is not None:
                k = spike_spec.rollback_after
                health = {**health, **bad_runs.count(health, "spike", spike, c.step + 1, k)}
        if feats.finite:
            first = health["first_nonfinite_step"]
            health = {
                **health,
                "nonfinite_steps": health["nonfinite_steps"] + (~finite).astype(jnp.int32),
                "first_nonfinite_step": jnp.where((first < 0) & ~finite, c.step + 1, first),
            }
            if feats.rollback_after is not None:
                k = feats.rollback_after
                health = {**health, **bad_runs.count(health, "nonfinite", ~finite, c.step + 1, k)}
        last = self._last(c.last, opt, c.step, extra)
        vals = jnp.stack([step_logs[k].astype(jnp.float32) for k in self.metric_order] + [1.0])
        acc = c.acc + jnp.where(ok, vals, 0.0)
        step = None if c.step is None else c.step + 1
        return Carry(params, rest, opt, extra, step, acc, last, health)

    def _last(self, last: dict, opt: Any, step: jax.Array | None, extra=None) -> dict:
        last = dict(last)
        spec = self.config.optimizers
        if self.config.features.lr and spec is not None:
            rates = learning_rates(spec, opt, step, extra)
            last.update({k: v for k, v in rates.items() if k in last})
        elif self.config.features.lr:
            # The updated state holds the lr this update used (the old one, the step before's).
            # lr is a feature only where the rate can be read (``carry.FitCarry.build``).
            lr = learning_rate_of(self.tx, opt, lr_schedule=self.config.lr_fn, step=step)
            if lr is not None:
                last["lr"] = lr.astype(jnp.float32)
        return last

    def _skipped(self, before: list, after: list) -> list:
        """A one-step call whose step was not finite, as the gated step leaves it: module
        and optimizer state from before it, step count, sums and health from after."""
        b = jax.tree.unflatten(self.treedef, before)
        a = jax.tree.unflatten(self.treedef, after)
        last = self._last(b.last, b.opt, b.step, b.extra)
        return jax.tree.leaves(
            Carry(b.params, b.rest, b.opt, b.extra, a.step, a.acc, last, a.health)
        )

    def _single(self, leaves, batch, gate: str | None):
        self.trace_count += 1
        if self.on_trace is not None:
            self.on_trace(CallKind.SINGLE.value, batch)
        c = jax.tree.unflatten(self.treedef, leaves)
        return jax.tree.leaves(self.one_step(c, batch, gate))

    def _multi(self, leaves, batches, gate: str | None):
        self.trace_count += 1
        if self.on_trace is not None:
            self.on_trace(CallKind.MULTI.value, batches)
        c = jax.tree.unflatten(self.treedef, leaves)
        c, _ = jax.lax.scan(
            lambda c, b: (self.one_step(c, b, gate), None),
            c,
            batches,
            unroll=self.config.scan_unroll,
        )
        return jax.tree.leaves(c)

    # -- eval and predict ----------------------------------------------------------------
    def _eval(self, module_leaves, acc, batch, method: str = "validation_step"):
        """One batch of ``validation_step`` / ``test_step`` added to the accumulator
        (``eval_accum.py``): batch means weighted by the batch's example count, whole-set
        metrics' sums added as they are."""
        self.eval_trace_count += 1
        params, rest = self._module_states(module_leaves)
        module = nnx.merge(self.eval_def, params, rest)
        _, means, metrics = split_outputs(getattr(module, method)(batch), method)
        return accumulate(acc, means, metrics, jax.tree.leaves(batch)[0].shape[0], method)

    def eval_program(self, method: str):
        return self.test_batch if method == "test_step" else self.eval_batch

    def eval_spec(self, module_leaves, batch, method: str = "validation_step") -> EvalSpec:
        """What ``method`` returns for batches like ``batch`` (names, sums, results), traced
        once per batch signature."""
        leaves, treedef = jax.tree.flatten(batch)
        key = (method, treedef, tuple((np.shape(x), np.result_type(x)) for x in leaves))
        spec = self._eval_specs.get(key)
        if spec is None:

            def trace(leaves, b):
                params, rest = self._module_states(leaves)
                return getattr(nnx.merge(self.eval_def, params, rest), method)(b)

            spec = EvalSpec(trace, (module_leaves, batch), method)
            self._eval_specs[key] = spec
        return spec

    def eval_metric_names(self, module_leaves, batch, method: str = "validation_step") -> list[str]:
        """The scalar names ``method`` logs (without prefix), found by tracing."""
        return list(self.eval_spec(module_leaves, batch, method).names)

    def _predict(self, module_leaves, batch):
        params, rest = self._module_states(module_leaves)
        module = nnx.merge(self.eval_def, params, rest)
        return module.predict_step(batch)

    def _module_states(self, module_leaves):
        n = self.n_params
        return (
            jax.tree.unflatten(self.params_def, module_leaves[:n]),
            jax.tree.unflatten(self.rest_def, module_leaves[n:]),
        )


def stack(leaves_list: list[list]) -> list:
    """Stack per-batch leaf lists along a new leading axis (numpy stays on the host)."""
    out = []
    for parts in zip(*leaves_list, strict=False):
        if all(isinstance(p, np.ndarray) for p in parts):
            out.append(np.stack(parts))
        else:
            out.append(jnp.stack([jnp.asarray(p) for p in parts]))
    return out
