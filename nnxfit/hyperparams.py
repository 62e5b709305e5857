"""The optimizer's hyperparameters during a fit: read the learning rate of any optax
optimizer that shows it, and read and set what ``optax.inject_hyperparams`` keeps in the
optimizer state, without recompiling the step.

Reading the learning rate (``learning_rate_of``), first source that has it:

1. an ``optax.inject_hyperparams`` state holding ``learning_rate`` (or ``lr``): the value the
   latest update used, exact;
2. the ``lr_schedule`` that ``configure_optimizers`` returned next to the optimizer
   (``{"optimizer": tx, "lr_schedule": schedule}``), on the step count;
3. the optimizer's own structure. optax builds its optimizers (``optax.adam(1e-2)``,
   ``optax.adamw(schedule)``, ``optax.sgd``, ...) as a ``chain`` ending in
   ``scale_by_learning_rate``: a ``scale`` by the constant rate, or a ``scale_by_schedule``
   that evaluates the schedule on a count it keeps in its state. The reader walks ``chain``,
   ``apply_if_finite`` and ``MultiSteps`` and multiplies the factors of every ``scale`` and
   ``scale_by_schedule`` stage, sign dropped: what the optimizer multiplies its update
   direction by. A constant of magnitude 1 is a sign flip, not a rate: optax ends ``rprop``
   and the deprecated ``optimistic_adam``, which apply their rate inside, with
   ``scale(-1.0)``; so a rate of exactly 1 reads as unknown. Other stages
   (``scale_by_adam``, clipping, weight decay) carry no rate. A transformation the reader
   cannot see into (a hand-written ``GradientTransformation``, ``optax.partition``,
   ``optax.contrib`` optimizers that keep their rate inside) shows none, and the answer is
   ``None``: never a guess, never an error.

The structure is optax's (function closures): ``tests/test_hyperparams.py`` pins the reader
on each optimizer above for the optax version installed.

Setting (``set_in_state``, ``Trainer.set_hyperparameter``) writes the value into every
injected state that holds the name, as an array of exactly the old one's type (dtype, weak
type, shape) and placement (device or sharding, committed or not). A change in any of them is
a new input signature for the jitted step, hence a compile; a committed array where the step
had an uncommitted one also commits every output, and the call after compiles once more.
"""

from __future__ import annotations

import functools
import operator
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nnxfit.errors import ConfigError

# optax >= 0.1.9 builds InjectStatefulHyperparamsState; the older class is still exported.
INJECT_STATES = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)
LR_NAMES = ("learning_rate", "lr")  # what optax optimizers call their rate

INJECT_FIX = "optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)"


# -- injected states ----------------------------------------------------------------------
def is_injected(x: Any) -> bool:
    return isinstance(x, INJECT_STATES)


def injected_states(opt_state: Any) -> list:
    """The ``optax.inject_hyperparams`` states in ``opt_state``, outermost first."""
    return [n for n in jax.tree.leaves(opt_state, is_leaf=is_injected) if is_injected(n)]


def lr_name(node: Any) -> str | None:
    """The hyperparameter name of the learning rate in an injected state, if it has one."""
    return next((k for k in LR_NAMES if k in node.hyperparams), None)


def lr_states(opt_state: Any) -> list:
    """The injected states in ``opt_state`` that hold a learning rate."""
    return [n for n in injected_states(opt_state) if lr_name(n) is not None]


def _key(node: Any, name: str) -> str | None:
    """``name``'s key in ``node.hyperparams``; ``learning_rate`` and ``lr`` are one name."""
    names = LR_NAMES if name in LR_NAMES else (name,)
    return next((k for k in names if k in node.hyperparams), None)


def _holders(opt_state: Any, name: str) -> list[tuple[Any, str]]:
    return [(n, k) for n in injected_states(opt_state) if (k := _key(n, name)) is not None]


def is_scheduled(node: Any, key: str) -> bool:
    """Whether ``inject_hyperparams`` recomputes ``key`` from a schedule at every update."""
    return key in (getattr(node, "hyperparams_states", None) or {})


# -- the learning rate, from any source ---------------------------------------------------
def learning_rate_of(
    tx: optax.GradientTransformation,
    opt_state: Any,
    *,
    lr_schedule: Any = None,
    step: Any = None,
) -> jax.Array | None:
    """The learning rate of the latest update ``tx`` made into ``opt_state`` (before any, of
    the first), as a float32 scalar, or ``None`` when it cannot be known (module docstring).

    Traceable: the train step calls it inside ``jit`` with no host sync. ``lr_schedule`` and
    ``step`` (optimizer steps before that update) are ``configure_optimizers``'s optional
    ``{"lr_schedule": ...}``."""
    nodes = lr_states(opt_state)
    if nodes:
        return jnp.asarray(nodes[0].hyperparams[lr_name(nodes[0])], jnp.float32)
    if lr_schedule is not None:
        return jnp.asarray(lr_schedule(0 if step is None else step), jnp.float32)
    return structural_learning_rate(tx, opt_state)


def learning_rate_source(
    tx: optax.GradientTransformation, opt_state: Any, lr_schedule: Any = None
) -> str | None:
    """Where ``learning_rate_of`` finds the rate: ``"optimizer state"``, ``"lr_schedule"``,
    ``"optimizer structure"``, or ``None``."""
    if lr_states(opt_state):
        return "optimizer state"
    if lr_schedule is not None:
        return "lr_schedule"
    if structural_learning_rate(tx, opt_state) is not None:
        return "optimizer structure"
    return None


def structural_learning_rate(tx: optax.GradientTransformation, opt_state: Any) -> Any:
    """The product of ``tx``'s ``scale`` / ``scale_by_schedule`` factors, sign dropped, or
    ``None`` when it has none that the reader can see."""
    try:
        stages = _scales(tx.update, opt_state)
        if all(_is_sign_flip(s) for s in stages):  # also when there is none
            return None
    except Exception:  # noqa: BLE001 - optax's internals moved: unreadable, not an error
        return None
    product = functools.reduce(operator.mul, [f for _, f in stages])
    return jnp.abs(jnp.asarray(product, jnp.float32))


def _is_sign_flip(stage: tuple) -> bool:
    """A constant factor of magnitude 1: optax's ``scale(-1.0)`` after a stage that applies
    its own rate (``rprop``, ``optimistic_adam``), not a rate."""
    kind, factor = stage
    return kind == "constant" and bool(np.abs(np.asarray(factor)) == 1)


def _free(fn: Any, name: str) -> Any:
    """The value of the free variable ``name`` of closure ``fn`` (ValueError if none)."""
    return fn.__closure__[fn.__code__.co_freevars.index(name)].cell_contents


def _scales(fn: Any, state: Any) -> list[tuple[str, Any]]:
    """The ``("constant" | "schedule", factor)`` stages of the transformation whose update
    function is ``fn``."""
    if isinstance(fn, types.MethodType) and isinstance(fn.__self__, optax.MultiSteps):
        return _scales(fn.__self__.inner_opt.update, state.inner_opt_state)
    if not str(getattr(fn, "__module__", "")).startswith("optax."):
        return []  # the user's own transformation: opaque
    name = getattr(fn, "__qualname__", "")
    if name == "chain.<locals>.update_fn":
        fns = _free(fn, "update_fns")
        if len(fns) != len(state):
            raise ValueError("chain state does not match its transformations")
        return [f for g, s in zip(fns, state, strict=True) for f in _scales(g, s)]
    if name == "with_extra_args_support.<locals>.update":
        return _scales(_free(fn, "tx").update, state)
    if name == "apply_if_finite.<locals>.update":
        return _scales(_free(fn, "inner").update, state.inner_state)
    if name == "scale.<locals>.update_fn":
        return [("constant", _free(fn, "step_size"))]
    if name == "scale_by_schedule.<locals>.update_fn":
        # The state's count is the next update's: the latest used the one before.
        return [("schedule", _free(fn, "step_size_fn")(jnp.maximum(state.count - 1, 0)))]
    return []


# -- reading and setting injected hyperparameters -----------------------------------------
def hyperparameter_names(opt_state: Any) -> list[str]:
    """Every hyperparameter the injected states of ``opt_state`` hold."""
    return sorted({k for n in injected_states(opt_state) for k in n.hyperparams})


def settable_error(opt_state: Any, name: str, owner: str) -> str | None:
    """Why ``name`` cannot be set in ``opt_state`` (a message naming the fix), or ``None``."""
    held = _holders(opt_state, name)
    if not held:
        names = hyperparameter_names(opt_state)
        if not names:
            return (
                f"{owner}'s optimizer keeps no hyperparameters in its state, so {name!r} "
                "cannot be changed during the fit. In configure_optimizers, wrap the optimizer "
                f"with optax.inject_hyperparams, e.g. {INJECT_FIX}: the step then reads "
                f"{name} from the optimizer state, and changing it never recompiles."
            )
        return (
            f"{owner}'s optimizer holds the hyperparameters {names} in its state, not "
            f"{name!r}. Pass {name} to the optax.inject_hyperparams-wrapped optimizer, and "
            "not among its static_args."
        )
    for node, key in held:
        if is_scheduled(node, key):
            return (
                f"{owner}'s {key} is a schedule inside optax.inject_hyperparams; the schedule "
                f"sets it at every step, overwriting any other value. Pass a constant {key}, "
                "or change the schedule instead."
            )
    return None


def get_in_state(opt_state: Any, name: str) -> Any:
    """The value of the injected hyperparameter ``name`` (outermost state first), or
    ``None``."""
    held = _holders(opt_state, name)
    if not held:
        return None
    node, key = held[0]
    return node.hyperparams[key]


def set_in_state(opt_state: Any, name: str, value: Any, owner: str = "the module") -> Any:
    """``opt_state`` with ``name`` set to ``value`` in every injected state that holds it,
    each array keeping its type and placement. A ``ConfigError`` naming the fix when
    ``name`` cannot be set."""
    why = settable_error(opt_state, name, owner)
    if why is not None:
        raise ConfigError(why)
    value = _number(name, value)

    def swap(node):
        key = _key(node, name) if is_injected(node) else None
        if key is None:
            return node
        new = write_like(node.hyperparams[key], value, f"{owner}'s {key}")
        return node._replace(hyperparams={**node.hyperparams, key: new})

    return jax.tree.map(swap, opt_state, is_leaf=is_injected)


def _number(name: str, value: Any) -> Any:
    if isinstance(value, jax.Array):
        value = np.asarray(jax.device_get(value))
    arr = np.asarray(value)
    if isinstance(value, bool) or arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number):
        raise ConfigError(f"hyperparameter {name!r} must be set to a number; got {value!r}.")
    return value


def write_like(old: Any, value: Any, what: str = "the hyperparameter") -> Any:
    """``value`` as ``old`` is: same dtype, weak type, shape, and the same device or sharding,
    committed or not; so that the jitted step that reads it sees the same input signature."""
    if not isinstance(old, jax.Array):  # a host value: the step sees its type only
        if isinstance(old, np.ndarray | np.generic):
            return np.asarray(value, old.dtype).reshape(np.shape(old))
        return type(old)(value)
    shape = np.shape(value)
    if shape == ():
        new = jax.lax.full_like(old, value)  # keeps dtype and weak type, uncommitted
    elif shape == old.shape:
        new = jax.device_put(np.asarray(value, old.dtype))
    else:
        raise ConfigError(f"{what} has shape {old.shape}; got a value of shape {shape}.")
    if old.committed and not (new.committed and new.sharding == old.sharding):
        new = jax.device_put(new, old.sharding)
    if jax.typeof(new) != jax.typeof(old) or new.committed != old.committed:
        raise ConfigError(
            f"could not write {what} as the step reads it: it is {describe(old)}, the new "
            f"value {describe(new)}; writing it would recompile the step."
        )
    return new


def describe(x: Any) -> str:
    """A leaf as a jitted function's cache sees it: type (``~`` = weak) and placement."""
    if not isinstance(x, jax.Array):
        return f"{type(x).__name__} (a host value)"
    if not x.committed:
        return f"{jax.typeof(x)} (uncommitted)"
    s = x.sharding
    if isinstance(s, jax.sharding.NamedSharding):
        where = f"sharded {s.spec} over {dict(s.mesh.shape)}"
    else:
        where = ", ".join(sorted(str(d) for d in s.device_set))
    return f"{jax.typeof(x)} (committed to {where})"


def host_value(x: Any) -> Any:
    """A device scalar as a Python float; a larger array as numpy (one device sync)."""
    v = np.asarray(jax.device_get(x))
    return float(v) if v.ndim == 0 else v


# -- the Trainer's side -------------------------------------------------------------------
def fit_optimizer(trainer, optimizer: str | None = None) -> tuple:
    """``(tx, opt_state, lr_schedule, step, owner)`` of the trainer's current (or last) fit.

    ``optimizer`` names one of several optimizers (``configure_optimizers`` returned a dict
    of them); with one optimizer it must be ``None``."""
    programs = trainer.programs
    if programs is None or programs.tx is None:
        raise ConfigError(
            "the trainer has no optimizer yet: hyperparameters are read and set during fit "
            "(from a callback's hook) or after it."
        )
    spec = programs.config.optimizers
    names = list(spec.names) if spec is not None else []
    module = getattr(trainer, "module", None)
    owner = type(module).__name__ if module is not None else "the module"
    step = max(trainer.global_step - 1, 0)  # steps before the latest update
    opt = trainer.train_state()["opt"]
    if not names:
        if optimizer is not None:
            raise ConfigError(
                f"optimizer={optimizer!r}, but this fit has one optimizer (configure_optimizers "
                "returned a single optax.GradientTransformation); leave optimizer out."
            )
        tx = programs.tx if spec is None else spec.txs[""]
        lr_fn = programs.config.lr_fn if spec is None else spec.lr_fns[""]
        return tx, opt, lr_fn, step, owner
    if optimizer not in names:
        got = "no optimizer=" if optimizer is None else f"optimizer={optimizer!r}"
        raise ConfigError(
            f"{owner} has the optimizers {names}; name one with optimizer=<name> (got {got})."
        )
    owner = f"{owner}[{optimizer!r}]"
    return spec.txs[optimizer], opt[optimizer], spec.lr_fns[optimizer], step, owner


def optimizer_names(trainer) -> list[str]:
    """The names of the fit's several optimizers; empty with one."""
    programs = trainer.programs
    spec = programs.config.optimizers if programs is not None else None
    return list(spec.names) if spec is not None else []


def get_hyperparameter(trainer, name: str, optimizer: str | None = None) -> Any:
    """``Trainer.get_hyperparameter``: see there."""
    tx, opt, lr_schedule, step, owner = fit_optimizer(trainer, optimizer)
    value = get_in_state(opt, name)
    if value is not None:
        return host_value(value)
    if name in LR_NAMES:
        lr = learning_rate_of(tx, opt, lr_schedule=lr_schedule, step=step)
        if lr is not None:
            return host_value(lr)
        raise ConfigError(
            f"cannot read the learning rate of {owner}'s optimizer {describe_tx(tx)}. In "
            f"configure_optimizers, build it with optax.inject_hyperparams, e.g. {INJECT_FIX}, "
            "or return {'optimizer': tx, 'lr_schedule': schedule}."
        )
    names = hyperparameter_names(opt)
    have = f"it holds {names}" if names else "it holds none"
    raise ConfigError(
        f"{owner}'s optimizer keeps no hyperparameter {name!r} in its state ({have}). Wrap the "
        f"optimizer with optax.inject_hyperparams and pass {name} to it, e.g. {INJECT_FIX}."
    )


def set_hyperparameter(trainer, name: str, value: Any, optimizer: str | None = None) -> None:
    """``Trainer.set_hyperparameter``: see there."""
    if not getattr(trainer, "fitting", False):
        raise ConfigError(
            f"set_hyperparameter({name!r}, ...) changes the optimizer of a running fit: call it "
            "from a callback's hook. A new fit starts its optimizer from configure_optimizers."
        )
    _, opt, _, _, owner = fit_optimizer(trainer, optimizer)
    state = trainer.train_state()
    new = set_in_state(opt, name, value, owner)
    state["opt"] = new if optimizer is None else {**state["opt"], optimizer: new}
    trainer.load_train_state(state)


def describe_tx(tx: Any) -> str:
    """A short name for an optax transformation: its update function's qualified name."""
    fn = getattr(tx, "update", None)
    name = getattr(fn, "__qualname__", type(tx).__name__)
    return f"({name.replace('.<locals>', '')})"
