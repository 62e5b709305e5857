"""The device state of a fit: one flat list of arrays (``FitCarry.leaves``), where each part of
it is (``CarryLayout``), and everything that reads or writes it.

Between calls the fit's state lives on the device as the leaves of a ``step.Carry``, in this
order: the module's variables (the trainable ``params``, then every other variable: ``rest``),
the optimizer state, what step features keep across steps (``extra``: the EMA of the params,
SpikeGuard's buffer), the step count (only when a step feature needs it: the *head*), then the
*tail*: the metric sums since the last log (``acc``), the latest step's values (``last``: the
lr) and the health counters (``nonfinite_steps``, ``first_nonfinite_step``). The jitted
programs (``step.Programs``) take and return that list, donated; ``step.py`` says why a flat
list.

* ``FitCarry.build`` sets up a fit's carry from the module: the optimizer
  (``configure_optimizers``), copies of the variables (donation must never delete arrays the
  caller holds), the metric names (traced), and a ``Programs`` built whole for this layout;
* ``run(call)`` sends one ``plan.Call`` through the train program of its kind;
* ``snapshot()`` takes the tail out (zeros go in) and starts its copy to the host, without a
  sync; ``read(snap)`` waits for it, sleeping (``wait_ready``), and keeps the host side of
  the metrics: the epoch's f64 sums (``epoch_acc``), the latest values, the health counts;
* the module object is written back (``to_module``) only when someone may look, and what a
  hook assigned to it is adopted (``from_module``): the handles on its variables are taken
  once (``module_leaves.live_leaves``), so neither walks the module;
* ``state_dict`` / ``load_state_dict``: the carry as pytrees (checkpoints, hyperparameters).
"""

from __future__ import annotations

import math
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nnxfit import averaging, bad_runs, optimizers, spikes
from nnxfit.errors import ConfigError
from nnxfit.hyperparams import learning_rate_source
from nnxfit.module_leaves import live_leaves
from nnxfit.speculation import should_speculate
from nnxfit.step import Carry, Programs, StepConfig, StepFeatures, metric_names


class CarryLayout(NamedTuple):
    """Where the parts of a fit's carry are in its flat list of leaves."""

    treedef: Any  # of step.Carry
    n_module: int  # leaves of the module's variables: params, then rest
    n_head: int  # + the optimizer state and the step count; the tail starts here
    tail_def: Any  # treedef of (acc, last, health): what a snapshot takes out
    step_index: int | None  # the device's step count, when a feature keeps it
    count_index: int | None  # health["nonfinite_steps"], with the finite check
    health_indices: tuple[int, ...]  # every health counter
    counter_indices: tuple[int, ...]  # those that count steps (the others name the first)
    ema_index: int | None  # the first leaf of extra["ema"] (params' order), with an EMA

    @classmethod
    def of(cls, carry: Carry, n_module: int) -> CarryLayout:
        head = (carry.params, carry.rest, carry.opt, carry.extra, carry.step)
        n_head = len(jax.tree.leaves(head))
        treedef = jax.tree.structure(carry)
        where = jax.tree.unflatten(treedef, range(treedef.num_leaves))
        return cls(
            treedef=treedef,
            n_module=n_module,
            n_head=n_head,
            tail_def=jax.tree.structure((carry.acc, carry.last, carry.health)),
            step_index=n_head - 1 if carry.step is not None else None,
            count_index=where.health.get("nonfinite_steps"),
            health_indices=tuple(where.health.values()),
            counter_indices=tuple(v for k, v in where.health.items() if k.endswith("_steps")),
            ema_index=jax.tree.leaves(where.extra["ema"])[0] if "ema" in carry.extra else None,
        )


class FitCarry:
    """A fit's device state and the host side of its metrics (see the module docstring)."""

    def __init__(self, programs: Programs, layout: CarryLayout, leaves: list, live_vars, placement):
        self.programs = programs
        self.layout = layout
        self.leaves = leaves
        self.live_vars = live_vars  # handles on the module's variables, in leaf order
        self.placement = placement
        self._train = programs.train()
        # Snapshots copy the tail's non-sum values when later calls may go out before the
        # snapshot is read (the loop's lookahead); else the live arrays are read as they are.
        self.copy_tail = False
        # The host side: f64 sums (and count) of the epoch's metrics over the snapshots read
        # so far (the carry's acc holds the sums since the last one), the latest values, and
        # the non-finite counts as of the latest read.
        self.epoch_acc = np.zeros(len(programs.metric_order) + 1, np.float64)
        self.last = jax.device_get(jax.tree.unflatten(layout.tail_def, leaves[layout.n_head :])[1])
        self.nonfinite_steps = 0
        self.first_nonfinite_step: int | None = None
        self.spike_steps = 0  # the same for SpikeGuard's spikes
        self.first_spike_step: int | None = None
        # By ``bad_runs`` kind: the step at which a run of bad steps reached its guard's
        # ``max_consecutive``, as of the latest read (``rollback.py``).
        self.rollback_at: dict[str, int | None] = {}
        # Jitted (4 us a call) rather than eager (20-50 us): they run at every log step. On a
        # mesh their outputs keep the carry's shardings, so the step sees the same signature.
        tail = leaves[layout.n_head :]
        zs = cs = {}
        if placement.is_sharded:
            zs = {"out_shardings": tail[0].sharding}
            cs = {"out_shardings": (tail[0].sharding, [x.sharding for x in tail[1:]])}
        self._fresh = jax.jit(jnp.zeros_like, **zs)
        self._fresh_copy = jax.jit(_zeros_and_copies, **cs)
        self._copy = jax.jit(_copies)

    @classmethod
    def build(cls, module, *, config, features: StepFeatures, spec, first_batch, placement):
        """The carry of a fit of ``module`` with the Trainer's ``config`` (``TrainerConfig``),
        the step ``features`` the callbacks ask for, the train batches' ``spec``
        (``data.BatchSpec``) and first batch, on ``placement``."""
        opts = optimizers.parse(module)
        optimizers.check_config(opts, config)
        tx, trainable = opts.tx(), opts.trainable
        lr_fn = None if opts.several else opts.lr_fns[""]
        module.eval()
        eval_def = nnx.graphdef(module)
        module.train()
        train_def, params_v, rest_v = nnx.split(module, trainable, ...)
        if not jax.tree.leaves(params_v):
            raise ConfigError(
                f"{type(module).__name__}.trainable = {module.trainable!r} matches no variable; "
                "the optimizer would update nothing. Use nnx.Param or a filter that matches."
            )
        # Variables, and handles on plain array attributes (``module_leaves.py``).
        live_vars = live_leaves(module, params_v, rest_v)
        # Copies, so that donation never deletes arrays the caller still holds.
        params = placement.put_state(jax.tree.map(jnp.copy, nnx.as_pure(params_v)), params_v)
        rest = placement.put_state(jax.tree.map(jnp.copy, nnx.as_pure(rest_v)), rest_v)
        opt = placement.init_optimizer(tx, params)  # mirrors the params' shardings
        # Several optimizers or manual optimization: the step takes ``spec``; else it runs
        # the single optimizer's programs as they always were.
        step_spec = opts if opts.several or opts.manual else None
        if features.lr and learning_rate_source(tx, opt, lr_fn) is None and step_spec is None:
            features = features.without("lr")  # nothing to log (LearningRateMonitor warns)
        rates = optimizers.readable_rates(opts, opt) if step_spec is not None else []
        if features.lr and step_spec is not None and not rates:
            features = features.without("lr")
        features = optimizers.check_features(opts, features)
        state_bytes = sum(x.nbytes for x in jax.tree.leaves((params, rest, opt)))
        speculate = should_speculate(
            features, state_bytes, placement.is_sharded, config.val_every_n_steps
        )
        A = config.grad_accum_steps
        step_config = StepConfig(
            A, config.grad_clip_norm, config.precision, features, lr_fn, speculate,
            config.scan_unroll, step_spec,
        )  # fmt: skip
        # The device counts steps only for features that need the count in the step.
        needs_step = features.finite or (features.lr and lr_fn is not None)
        needs_step = needs_step or features.spike is not None
        health = {}
        if features.finite:
            health = {
                "nonfinite_steps": jnp.zeros((), jnp.int32),
                "first_nonfinite_step": jnp.full((), -1, jnp.int32),
            }
        extra = {}
        if features.ema_decay is not None:
            extra["ema"] = averaging.init(params)  # sharded as params are
        if features.spike is not None:
            extra["spike"] = spikes.init(features.spike)
            health.update(spikes.init_health())
            if features.spike.rollback_after is not None:
                health.update(bad_runs.init_health("spike"))
        if features.rollback_after is not None:
            health.update(bad_runs.init_health("nonfinite"))
        if opts.manual:
            extra["opt_steps"] = optimizers.opt_steps_init(opts)
        last = {"lr": jnp.zeros((), jnp.float32)} if features.lr else {}
        if features.lr and step_spec is not None:
            last = {opts.log_name("lr", k): jnp.zeros((), jnp.float32) for k in rates}
        names = metric_names(
            train_def, trainable, step_config, spec.treedef, params, rest,
            jax.tree.leaves(first_batch),
        )  # fmt: skip
        step = jnp.zeros((), jnp.int32) if needs_step else None
        acc = jnp.zeros((len(names) + 1,), jnp.float32)
        carry = Carry(params, rest, opt, extra, step, acc, last, health)
        leaves = placement.put_carry(jax.tree.leaves(carry))
        programs = Programs(
            train_def=train_def,
            eval_def=eval_def,
            trainable=trainable,
            tx=tx,
            config=step_config,
            treedef=jax.tree.structure(carry),
            batch_def=spec.treedef,
            params_def=jax.tree.structure(params),
            rest_def=jax.tree.structure(rest),
            metric_order=names,
            shardings=[x.sharding for x in leaves] if placement.is_sharded else None,
        )
        layout = CarryLayout.of(carry, n_module=len(live_vars))
        return cls(programs, layout, leaves, live_vars, placement)

    # -- the train programs ---------------------------------------------------------------
    def run(self, call) -> None:
        """Sends ``call`` (a ``plan.Call``) to the device: asynchronous, donating the carry."""
        self.leaves = self._train[call.kind](self.leaves, call.batch)

    def gate_from_now(self) -> None:
        """Every later call gates its update (``NaNGuard("stop")`` halted, ``speculation.py``)."""
        self._train = self.programs.train(gated=True)

    def program(self, kind):
        """The train program ``run`` sends a call of ``kind`` (``step.CallKind``) to now."""
        return self._train[kind]

    # -- pieces of it ----------------------------------------------------------------------
    def module_leaves(self) -> list:
        """The module's variables as the eval and predict programs take them."""
        return self.leaves[: self.layout.n_module]

    def ema_leaves(self) -> list | None:
        """The EMA of the trainable params (their leaf order), with ``EMA``; else None."""
        i = self.layout.ema_index
        return None if i is None else self.leaves[i : i + self.programs.n_params]

    def validation_leaves(self) -> list:
        """What validation runs on: the module's variables, the params replaced by their
        average with ``EMA(validate_with_ema=True)``."""
        leaves = self.module_leaves()
        if not self.programs.config.features.ema_validate:
            return leaves
        return self.ema_leaves() + leaves[self.programs.n_params :]

    def copy(self, leaves: list | None = None) -> list:
        """A copy of the carry (or of ``leaves`` in its layout) on the device, asynchronous:
        what a later call donates never deletes it."""
        return self._copy(self.leaves if leaves is None else leaves)

    def count(self, leaves: list | None = None) -> int:
        """The non-finite step count in ``leaves`` (the live carry by default); waits."""
        x = (self.leaves if leaves is None else leaves)[self.layout.count_index]
        wait_ready([x])
        return int(x)

    def snapshot_count(self, snap: list) -> int:
        """The non-finite step count in a snapshot; waits."""
        x = snap[self.layout.count_index - self.layout.n_head]
        wait_ready([x])
        return int(x)

    def set_step(self, step: int) -> None:
        """Sets the device's step count (when it keeps one) to ``step``."""
        i = self.layout.step_index
        if i is not None:
            self.leaves[i] = jnp.full_like(self.leaves[i], step)

    def done_flag(self) -> jax.Array:
        """A new one-element array, ready once the device has finished the last call sent:
        the train programs donate the carry, so its own arrays cannot be waited on after the
        next call. Made from this process's copy of the metric sums, so that on several
        processes it is a local program that none of the others has to run."""
        local = self.leaves[self.layout.n_head].addressable_shards[0].data
        return _first(local)

    # -- metrics -------------------------------------------------------------------------
    def snapshot(self) -> list:
        """Takes the metric sums since the last snapshot out of the carry (zeros go in) and,
        with ``copy_tail``, copies of the other tail values (lr, non-finite counters). The
        host copy starts now; ``read`` collects it."""
        i = self.layout.n_head
        leaves = self.leaves
        tail = leaves[i:]
        if self.copy_tail:
            zeros, rest = self._fresh_copy(tail[0], tail[1:])
        else:  # read before the next call: no copies needed
            zeros, rest = self._fresh(tail[0]), tail[1:]
        snap = [tail[0], *rest]
        leaves[i] = zeros
        for x in snap:
            x.copy_to_host_async()
        return snap

    def read(self, snap: list | None) -> tuple[np.ndarray, dict]:
        """The sums and latest values of ``snap`` on the host (None: nothing to add); updates
        the non-finite counts."""
        if snap is None:
            return np.zeros_like(self.epoch_acc), self.last
        wait_ready(snap)
        # np.asarray per leaf: ``jax.device_get`` of the same tree costs ~20 us more.
        host = [np.asarray(x) for x in snap]
        acc, last, health = jax.tree.unflatten(self.layout.tail_def, host)
        self.last = last
        if "nonfinite_steps" in health:
            self.nonfinite_steps = int(health["nonfinite_steps"])
            first = int(health["first_nonfinite_step"])
            self.first_nonfinite_step = first if first >= 0 else None
        if "spike_steps" in health:
            self.spike_steps = int(health["spike_steps"])
            first = int(health["first_spike_step"])
            self.first_spike_step = first if first >= 0 else None
        for kind in bad_runs.KINDS:  # a run of bad steps long enough to roll back
            if bad_runs.at_key(kind) in health:
                at = int(health[bad_runs.at_key(kind)])
                self.rollback_at[kind] = at if at >= 0 else None
        return np.asarray(acc, np.float64), last

    def means(self, acc: np.ndarray, last: dict) -> dict[str, float]:
        """Logs from sums ``acc`` (their count last) and latest values ``last``."""
        n = acc[-1]
        order = self.programs.metric_order
        logs = {k: float(v / n) if n > 0 else math.nan for k, v in zip(order, acc, strict=False)}
        logs.update({k: float(v) for k, v in last.items()})
        if self.programs.config.features.finite:
            logs["nonfinite_steps"] = float(self.nonfinite_steps)
        if self.programs.config.features.spike is not None:
            logs["spike_steps"] = float(self.spike_steps)
        return logs

    # -- the module object ---------------------------------------------------------------
    def to_module(self, allow_deleted: bool = False) -> None:
        """Points the module's variables at the current device arrays (cheap: no tree walk)."""
        for var, x in zip(self.live_vars, self.module_leaves(), strict=False):
            if allow_deleted and isinstance(x, jax.Array) and x.is_deleted():
                continue
            var.set_raw_value(x)

    def from_module(self) -> None:
        """Adopts whatever a hook assigned to the module's variables."""
        leaves, placement = self.leaves, self.placement
        for i, var in enumerate(self.live_vars):
            x = var.get_raw_value()
            if x is not leaves[i]:
                old = leaves[i]
                x = jnp.asarray(x)
                if x.shape != old.shape or x.dtype != old.dtype:
                    raise ConfigError(
                        f"a callback set a module variable of shape {old.shape} {old.dtype} to "
                        f"shape {x.shape} {x.dtype}; variables must keep their shape and dtype."
                    )
                leaves[i] = placement.put_state(x, var) if placement.is_sharded else x

    # -- as pytrees ----------------------------------------------------------------------
    def state_dict(self, leaves: list | None = None) -> dict:
        """The carry (or ``leaves`` in its layout) as ``step.Carry`` fields of pytrees."""
        c = jax.tree.unflatten(self.layout.treedef, self.leaves if leaves is None else leaves)
        return c._asdict()

    def load_state_dict(self, state: dict) -> None:
        """Replaces the device state with ``state`` (same structure as ``state_dict()``)."""
        leaves = jax.tree.leaves(Carry(**state))
        if len(leaves) != len(self.leaves):
            raise ConfigError("restored state has a different number of arrays than the fit.")
        self.leaves = leaves


_first = jax.jit(lambda x: x[:1])


def wait_ready(arrays: list) -> None:
    """Waits for ``arrays`` by polling with short sleeps.

    ``block_until_ready`` busy-waits; on a 2-core CPU host that spinning thread takes a core
    from XLA's compute threads for the whole wait, and a sync every epoch cost ~20 % of
    throughput in ``benchmarks/overhead.py``. Sleeping hands the core back.
    """
    pause = 5e-5
    for x in arrays:
        if isinstance(x, jax.Array):
            while not x.is_ready():
                time.sleep(pause)
                # Backing off to 1 ms: waking every 50 us through a long wait (the host ahead
                # of a compute-bound device) took ~10 % of a 2-core machine from XLA.
                pause = min(pause * 1.5, 1e-3)


def _zeros_and_copies(acc: jax.Array, rest: list) -> tuple[jax.Array, list]:
    return jnp.zeros_like(acc), _copies(rest)


def _copies(leaves: list) -> list:
    # ``x + 0`` rather than ``x``: jit would hand back the input itself, which the next call
    # then donates.
    return [_copy_leaf(x) for x in leaves]


def _copy_leaf(x: jax.Array) -> jax.Array:
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # typed keys do not add
        return jax.random.wrap_key_data(
            _copy_leaf(jax.random.key_data(x)), impl=jax.random.key_impl(x)
        )
    return x + jnp.zeros_like(x)
