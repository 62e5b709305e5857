"""What ``configure_optimizers`` returned, read once per fit (``OptimizerSpec``): one optax
optimizer, or several by name over disjoint parts of the parameters, stepped automatically
(one loss each) or by the module itself (``automatic_optimization = False``).

The fit's carry keeps one ``params`` state, the union of the optimizers' filters, so that
the module's variables, checkpoints, EMA and eval programs see one layout whatever the
optimizers. The parts are cut out of it by path (``OptimizerSpec.split``), which costs
tracing time only. Several optimizers act as one optax transformation over the union
(``OptimizerSpec.tx``): its state is ``{name: state}``, each updated on its own part.

Automatic, several losses (``named_value_and_grad``): each optimizer gets the gradient of its
own loss with respect to its own part, all from the same state, as a hand-written loop with
one ``nnx.value_and_grad(argnums=nnx.DiffState(0, filter))`` per optimizer computes them.
Manual: ``manual_step.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nnxfit.errors import ConfigError
from nnxfit.hyperparams import learning_rate_of, learning_rate_source
from nnxfit.warn import warn

SINGLE_KEYS = frozenset({"optimizer", "lr_schedule"})  # the single optimizer's dict form
FORMS = (
    "an optax.GradientTransformation (e.g. optax.adamw(1e-3)), {'optimizer': tx, "
    "'lr_schedule': schedule}, or several by name, {'gen': tx, 'disc': tx} (each value a "
    "transformation or {'optimizer': tx, 'lr_schedule': schedule})"
)


class UntrainedParamsWarning(UserWarning):
    """Several optimizers' filters leave some ``nnx.Param`` out: those stay frozen."""


@dataclasses.dataclass(eq=False)
class OptimizerSpec:
    """The optimizers of a fit. ``names`` is empty for a single optimizer (logged as
    ``lr``); else the optimizers' names in ``configure_optimizers``'s order (``lr_<name>``,
    ``loss_<name>``). ``paths``: with several, the params' paths each one owns."""

    txs: dict[str, optax.GradientTransformation]
    lr_fns: dict[str, Callable | None]
    filters: dict[str, Any]
    names: tuple[str, ...]
    manual: bool
    owner: str = "the module"
    paths: dict[str, frozenset] = dataclasses.field(default_factory=dict)

    @property
    def several(self) -> bool:
        return bool(self.names)

    @property
    def keys(self) -> tuple[str, ...]:
        """The keys of ``txs``: the names, or ``("",)`` for the single optimizer."""
        return self.names or ("",)

    @property
    def trainable(self) -> Any:
        """The filter of every variable some optimizer updates."""
        if not self.several:
            return self.filters[""]
        return nnx.Any(*self.filters.values())

    def log_name(self, base: str, key: str) -> str:
        """``lr`` / ``lr_<name>`` (or any ``base``) for the optimizer under ``key``."""
        return f"{base}_{key}" if key else base

    # -- the union params state, cut by optimizer --------------------------------------------
    def split(self, state: Any) -> dict[str, Any]:
        """``state`` (the union params, or a tree of their shape) as ``{name: part}``."""
        filters = [(lambda path, _, s=self.paths[n]: tuple(path) in s) for n in self.names]
        parts = nnx.split_state(state, *filters)
        return dict(zip(self.names, parts, strict=True))

    def join(self, parts: dict[str, Any]) -> Any:
        return nnx.merge_state(*(parts[n] for n in self.names))

    def tx(self) -> optax.GradientTransformation:
        """The optax transformation the automatic step applies: the single one, or the
        several ones as one over the union (state ``{name: state}``)."""
        if not self.several:
            return self.txs[""]
        txs = self.txs

        def init(params):
            return {n: txs[n].init(p) for n, p in self.split(params).items()}

        def update(grads, state, params=None):
            gs = self.split(grads)
            ps = self.split(params) if params is not None else dict.fromkeys(self.names)
            ups, new = {}, {}
            for n in self.names:
                ups[n], new[n] = txs[n].update(gs[n], state[n], ps[n])
            return self.join(ups), new

        return optax.GradientTransformation(init, update)

    def states(self, opt: Any) -> dict[str, Any]:
        """The optax state of each optimizer in the carry's ``opt``, by key."""
        return opt if self.several else {"": opt}


# -- reading configure_optimizers ------------------------------------------------------------
def _one(owner: str, value: Any, where: str) -> tuple[optax.GradientTransformation, Any]:
    lr_fn = None
    tx = value
    if isinstance(value, dict):
        tx = value.get("optimizer")
        lr = value.get("lr_schedule")
        lr_fn = lr if callable(lr) or lr is None else (lambda step, lr=lr: lr)
    if not isinstance(tx, optax.GradientTransformation):
        raise TypeError(
            f"{owner}.configure_optimizers returned {type(tx).__name__}{where}; it must return "
            f"{FORMS}."
        )
    return tx, lr_fn


def parse_output(owner: str, out: Any) -> tuple[dict, dict, tuple[str, ...]]:
    """``configure_optimizers``'s value as ``(txs, lr_fns, names)`` (``OptimizerSpec``)."""
    if isinstance(out, dict) and (not out or set(out) - SINGLE_KEYS):
        if not out:
            raise ConfigError(f"{owner}.configure_optimizers returned an empty dict: {FORMS}.")
        txs, lr_fns = {}, {}
        for name, value in out.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise ConfigError(
                    f"{owner}.configure_optimizers returned an optimizer named {name!r}; name "
                    "them with identifiers (they are logged as loss_<name> and lr_<name>)."
                )
            txs[name], lr_fns[name] = _one(owner, value, f" under {name!r}")
        return txs, lr_fns, tuple(out)
    tx, lr_fn = _one(owner, out, "")
    return {"": tx}, {"": lr_fn}, ()


def parse(module: Any) -> OptimizerSpec:
    """The ``OptimizerSpec`` of ``module``: ``configure_optimizers()``, ``trainable`` and
    ``automatic_optimization`` checked against each other and against the module's
    variables (``ConfigError`` naming the fix)."""
    owner = type(module).__name__
    txs, lr_fns, names = parse_output(owner, module.configure_optimizers())
    manual = not getattr(module, "automatic_optimization", True)
    trainable = module.trainable
    if not names:
        if isinstance(trainable, dict):
            raise ConfigError(
                f"{owner}.trainable is a dict with keys {sorted(map(str, trainable))}, but "
                "configure_optimizers returned one optimizer. Return a dict of optimizers "
                "with the same keys, or set trainable to one nnx filter."
            )
        return OptimizerSpec(txs, lr_fns, {"": trainable}, (), manual, owner)
    if not isinstance(trainable, dict):
        raise ConfigError(
            f"{owner}.configure_optimizers returned the optimizers {list(names)}, so "
            f"{owner}.trainable must be a dict with the same keys, each an nnx filter of what "
            f"that optimizer updates, e.g. trainable = {{{names[0]!r}: "
            f"nnx.All(nnx.Param, nnx.PathContains({names[0]!r})), ...}}; it is {trainable!r}."
        )
    missing, extra = (
        [n for n in names if n not in trainable],
        [n for n in trainable if n not in txs],
    )
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"trainable has no filter for the optimizers {missing}")
        if extra:
            parts.append(f"configure_optimizers returned no optimizer for the filters {extra}")
        raise ConfigError(
            f"{owner}: {' and '.join(parts)}; configure_optimizers and trainable must have "
            f"the same keys (optimizers {list(names)}, filters {list(trainable)})."
        )
    filters = {n: trainable[n] for n in names}
    spec = OptimizerSpec(txs, lr_fns, filters, names, manual, owner)
    spec.paths = _owned_paths(module, spec)
    return spec


def _path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _owned_paths(module: Any, spec: OptimizerSpec) -> dict[str, frozenset]:
    """The paths of the variables each optimizer's filter matches; an overlap, or a filter
    that matches nothing, is a ``ConfigError``; ``nnx.Param``s no filter covers are named in
    an ``UntrainedParamsWarning``."""
    owner = spec.owner
    paths: dict[str, frozenset] = {}
    for n, f in spec.filters.items():
        paths[n] = frozenset(tuple(p) for p, _ in nnx.to_flat_state(nnx.state(module, f)))
        if not paths[n]:
            raise ConfigError(
                f"{owner}.trainable[{n!r}] = {f!r} matches no variable; optimizer {n!r} would "
                "update nothing. Use a filter that matches its parameters, e.g. "
                f"nnx.All(nnx.Param, nnx.PathContains('submodule'))."
            )
    names = list(spec.names)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared = paths[a] & paths[b]
            if shared:
                raise ConfigError(
                    f"{owner}.trainable[{a!r}] and trainable[{b!r}] overlap: both match "
                    f"{_path_str(min(shared))} ({len(shared)} shared variable(s)). Each "
                    "variable belongs to one optimizer: make the filters disjoint."
                )
    covered = frozenset().union(*paths.values())
    params = [tuple(p) for p, _ in nnx.to_flat_state(nnx.state(module, nnx.Param))]
    left = sorted(p for p in params if p not in covered)
    if left:
        shown = ", ".join(_path_str(p) for p in left[:5])
        more = f" and {len(left) - 5} more" if len(left) > 5 else ""
        warn(
            f"{owner}: no optimizer's filter covers the parameters {shown}{more} (the "
            f"filters of {list(names)}); they stay frozen. If they should train, add them to "
            "one filter in trainable; if freezing them is meant, silence this with "
            "warnings.filterwarnings('ignore', category=nnxfit.UntrainedParamsWarning).",
            UntrainedParamsWarning,
        )
    return paths


def check_config(spec: OptimizerSpec, config: Any) -> None:
    """Trainer options that manual optimization cannot honour: ``ConfigError`` naming them."""
    if not spec.manual:
        return
    owner = spec.owner
    if config.grad_accum_steps > 1 or config.grad_clip_norm is not None:
        opts = []
        if config.grad_accum_steps > 1:
            opts.append(f"grad_accum_steps={config.grad_accum_steps}")
        if config.grad_clip_norm is not None:
            opts.append(f"grad_clip_norm={config.grad_clip_norm}")
        raise ConfigError(
            f"{owner} sets automatic_optimization = False, so training_step computes and applies "
            f"its own gradients and the Trainer cannot honour {' and '.join(opts)}. Clip inside "
            "the optimizer instead (optax.chain(optax.clip_by_global_norm(1.0), optax.adam(...)))"
            " and accumulate with optax.MultiSteps in configure_optimizers."
        )
    if config.precision != "float32":
        raise ConfigError(
            f"{owner} sets automatic_optimization = False with precision={config.precision!r}; "
            "the Trainer cannot cast a step that updates its own parameters. Use "
            "precision='float32' and cast inside training_step."
        )


# -- several losses, automatic -----------------------------------------------------------------
def named_value_and_grad(loss: Callable, spec: OptimizerSpec) -> Callable:
    """``vg(params, rest, batch) -> ((sum, (metrics, new rest)), grads)`` where ``loss``
    returns ``({name: loss}, (metrics, new rest))``: each optimizer's part of ``grads`` is the
    gradient of its own loss, the others held constant; ``metrics`` gain ``loss_<name>``."""

    def vg(params, rest, batch):
        parts = spec.split(params)
        gparts, first = {}, None
        for n in spec.names:

            def own(p, n=n):
                losses, aux = loss(spec.join({**parts, n: p}), rest, batch)
                return losses[n], (losses, aux)

            (_, out), gparts[n] = jax.value_and_grad(own, has_aux=True)(parts[n])
            first = out if first is None else first  # every pass starts from the same state
        losses, (metrics, new_rest) = first
        logged = {f"loss_{n}": losses[n] for n in spec.names}
        total = sum(losses[n] for n in spec.names)
        return (total, ({**logged, **metrics}, new_rest)), spec.join(gparts)

    return vg


def clip_and_norms(spec: OptimizerSpec, norm: Callable, g: Any, clip: float | None):
    """Each optimizer's gradient norm, and ``g`` with each part clipped to ``clip`` by its
    own norm (their losses differ: one's scale says nothing about another's). Returns
    ``(global norm, g, {name: norm})``."""
    parts = spec.split(g)
    norms = {n: norm(parts[n]) for n in spec.names}
    total = jnp.sqrt(sum(v * v for v in norms.values()))
    if clip is not None:
        for n in spec.names:
            scale = jnp.minimum(1.0, clip / (norms[n] + 1e-12))
            parts[n] = jax.tree.map(lambda x, s=scale: x * s.astype(x.dtype), parts[n])
        g = spec.join(parts)
    return total, g, norms


# -- the learning rates and the manual optimizers' step counts ---------------------------------
def opt_steps_init(spec: OptimizerSpec) -> Any:
    """The ``nnx.Optimizer.step`` counts of a manual fit (``Carry.extra["opt_steps"]``): one
    scalar, or ``{name: scalar}``."""
    zero = lambda: jnp.zeros((), jnp.uint32)  # noqa: E731 - one array per optimizer (donation)
    return {n: zero() for n in spec.names} if spec.several else zero()


def opt_step_of(spec: OptimizerSpec, steps: Any, key: str) -> Any:
    return steps[key] if spec.several else steps


def learning_rates(spec: OptimizerSpec, opt: Any, step: Any, extra: dict | None) -> dict:
    """``{lr or lr_<name>: rate}`` of the latest update of each optimizer whose rate can be
    read (``hyperparams.learning_rate_of``); a schedule is evaluated on the fit's step count
    (automatic) or on that optimizer's own count (manual: it may step any number of times)."""
    out = {}
    for k, state in spec.states(opt).items():
        at = step
        if spec.manual and extra is not None and "opt_steps" in extra:
            n = opt_step_of(spec, extra["opt_steps"], k).astype(jnp.int32)
            at = jnp.maximum(n - 1, 0)
        lr = learning_rate_of(spec.txs[k], state, lr_schedule=spec.lr_fns[k], step=at)
        if lr is not None:
            out[spec.log_name("lr", k)] = lr.astype(jnp.float32)
    return out


def readable_rates(spec: OptimizerSpec, opt: Any) -> list[str]:
    """The keys of the optimizers whose learning rate can be read."""
    return [
        k
        for k, state in spec.states(opt).items()
        if learning_rate_source(spec.txs[k], state, spec.lr_fns[k]) is not None
    ]


def check_features(spec: OptimizerSpec, features: Any) -> Any:
    """The step features a manual step can compute: it never sees the gradients, so the
    gradient norms are dropped (``GradNormMonitor`` warns) and a ``SpikeGuard`` on
    ``grad_norm`` is a ``ConfigError``."""
    if not spec.manual:
        return features
    if features.spike is not None and features.spike.monitor == "grad_norm":
        raise ConfigError(
            f"SpikeGuard(monitor='grad_norm') needs the gradient norm, but {spec.owner} sets "
            "automatic_optimization = False: its training_step applies its own gradients, "
            "which the Trainer never sees. Use SpikeGuard(monitor='loss')."
        )
    return features.without("grad_norm", "module_grad_norms")


def trainable_filter(module: Any) -> Any:
    """``module.trainable`` as one ``nnx`` filter: a dict of filters (several optimizers) is
    their union."""
    t = module.trainable
    return nnx.Any(*t.values()) if isinstance(t, dict) else t
