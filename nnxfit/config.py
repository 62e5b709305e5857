"""The Trainer's options, validated once: ``TrainerConfig``.

``Trainer(**options)`` builds a frozen ``TrainerConfig``; every option is also readable as an
attribute of the Trainer (``trainer.max_epochs``), and setting one there builds a new,
validated config (``trainer.max_epochs = 20`` before a longer fit). What a field means is in
the README's Trainer section; here is how each is checked and what a checkpoint records:

* ``recorded`` options go into every checkpoint's metadata (``trainer_options``), with the
  facts of the run that options do not say (batch size, mesh shape, device count, the
  ``ArrayLoader``'s settings);
* ``exact`` options change the numbers a step computes: a resume with any of them changed
  (or the batch size) cannot continue bit for bit, so it warns (``EXACTNESS_OPTIONS``).

``fast_dev_run=n`` is expanded here: one epoch of ``n`` optimizer steps and ``n`` validation
batches, and nothing written (no default ``CSVLogger``, no workdir; file-writing callbacks
check ``trainer.fast_dev_run``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from nnxfit.data import ArrayLoader
from nnxfit.errors import ConfigError, positive_int

PRECISIONS = ("float32", "bfloat16")


def _option(default: Any, *, recorded: bool = True, exact: bool = False) -> Any:
    return field(default=default, metadata={"recorded": recorded, "exact": exact})


@dataclass(frozen=True)
class TrainerConfig:
    """Every ``Trainer`` option but ``callbacks``, validated (see the module docstring)."""

    max_epochs: int | None = _option(None)
    max_steps: int | None = _option(None)
    seed: int = _option(0, exact=True)
    log_every_n_steps: int = _option(50)
    val_every_n_epochs: int = _option(1)
    val_every_n_steps: int | None = _option(None)
    steps_per_execution: int = _option(1, exact=True)
    grad_accum_steps: int = _option(1, exact=True)
    grad_clip_norm: float | None = _option(None, exact=True)
    precision: str = _option("float32", exact=True)
    limit_train_batches: int | None = _option(None)
    limit_val_batches: int | None = _option(None)
    overfit_batches: int | None = _option(None)
    prefetch: int = _option(0)
    workdir: str | None = _option(None, recorded=False)
    mesh: jax.sharding.Mesh | None = _option(None, recorded=False)
    progress_bar: bool = _option(True, recorded=False)
    console: Any = _option(None, recorded=False)
    fast_dev_run: bool | int = _option(False, recorded=False)
    num_sanity_val_steps: int = _option(2, recorded=False)
    # How the K-step scan runs, never what it computes (``loop_convs.py``, ``step.py``).
    scan_unroll: int | bool = _option(1, recorded=False)

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if self.max_epochs is None and self.max_steps is None and not self.fast_dev_run:
            raise ConfigError(
                "Trainer needs max_epochs or max_steps (or both; it stops at whichever comes "
                "first), e.g. Trainer(max_epochs=10)."
            )
        for name in ("max_epochs", "max_steps"):
            put(name, positive_int(name, getattr(self, name), allow_none=True))
        for name in ("log_every_n_steps", "val_every_n_epochs", "steps_per_execution"):
            put(name, positive_int(name, getattr(self, name)))
        put("grad_accum_steps", positive_int("grad_accum_steps", self.grad_accum_steps))
        for name in ("limit_train_batches", "limit_val_batches", "overfit_batches"):
            put(name, positive_int(name, getattr(self, name), allow_none=True))
        put(
            "val_every_n_steps",
            positive_int("val_every_n_steps", self.val_every_n_steps, allow_none=True),
        )
        fast = 1 if self.fast_dev_run is True else self.fast_dev_run
        put("fast_dev_run", fast)
        if fast:
            n = positive_int("fast_dev_run", fast)
            put("max_epochs", 1)
            put("max_steps", n)
            put("limit_train_batches", n * self.grad_accum_steps)
            put("limit_val_batches", n)
        clip = self.grad_clip_norm
        if clip is not None and not (isinstance(clip, int | float) and clip > 0):
            raise ConfigError(f"grad_clip_norm must be a number > 0 or None; got {clip!r}.")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}; got {self.precision!r}.")
        if not isinstance(self.prefetch, int) or self.prefetch < 0:
            raise ConfigError(f"prefetch must be an integer >= 0; got {self.prefetch!r}.")
        put("seed", int(self.seed))
        workdir = os.fspath(self.workdir) if self.workdir is not None else None
        if workdir is not None and os.path.exists(workdir) and not os.path.isdir(workdir):
            raise ConfigError(
                f"workdir {workdir!r} exists and is a file; pass a folder path (it is "
                "created if missing)."
            )
        put("workdir", workdir)
        put("num_sanity_val_steps", sanity_steps(self.num_sanity_val_steps))
        put("scan_unroll", check_scan_unroll(self.scan_unroll))

    def replace(self, **changes: Any) -> TrainerConfig:
        """A new config with ``changes``, validated."""
        return dataclasses.replace(self, **changes)

    def recorded(self) -> dict[str, Any]:
        """The options a checkpoint records, by name."""
        return {f.name: getattr(self, f.name) for f in FIELDS if f.metadata["recorded"]}


def check_scan_unroll(value: Any) -> int | bool:
    """``scan_unroll``: steps per loop iteration of the K-step scan (an integer >= 1), or True
    (no loop)."""
    if value is True:
        return True
    if isinstance(value, int | np.integer) and not isinstance(value, bool) and value >= 1:
        return int(value)
    raise ConfigError(
        f"scan_unroll must be an integer >= 1 (steps per loop iteration of the "
        f"steps_per_execution scan) or True (no loop); got {value!r}."
    )


def sanity_steps(value: Any) -> int:
    """``num_sanity_val_steps``: batches of the validation sanity check (``sanity.py``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < -1:
        raise ConfigError(
            f"num_sanity_val_steps must be an integer >= 0 (0 turns the validation sanity "
            f"check off) or -1 (every validation batch); got {value!r}."
        )
    return value


FIELDS = dataclasses.fields(TrainerConfig)
OPTION_NAMES = tuple(f.name for f in FIELDS)
# What a resume compares to warn that it cannot continue bit for bit: the ``exact`` options,
# and the batch size, a fact of the data.
EXACTNESS_OPTIONS = (
    *(f.name for f in FIELDS if f.metadata["exact"]),
    "batch_size",
)


def trainer_options(trainer) -> dict:
    """What a checkpoint records of the fit's settings (and a resume compares): the recorded
    options, the batch size, the mesh's shape, the device count, the ``ArrayLoader``'s
    settings. JSON-ready."""
    out: dict[str, Any] = trainer.config.recorded()
    spec = trainer.batch_spec
    out["batch_size"] = getattr(spec, "batch_size", None)
    placement = getattr(trainer, "placement", None)
    if out["batch_size"] is not None and getattr(placement, "multiprocess", False):
        # Each process feeds its slices of the 'data' axis: the numbers follow the global batch.
        out["batch_size"] = out["batch_size"] * placement.data_size // placement.local_data_shards
    mesh = trainer.config.mesh
    out["mesh"] = dict(mesh.shape) if mesh is not None else None
    out["num_devices"] = jax.device_count()
    out["loader"] = _loader_options(trainer.train_data)
    return json.loads(json.dumps(out, default=str))


def _loader_options(data: Any) -> dict | None:
    """An ``ArrayLoader``'s settings: the order of its batches follows from them."""
    if not isinstance(data, ArrayLoader):
        return None
    return {
        "seed": data.seed,
        "shuffle": data.shuffle,
        "batch_size": data.batch_size,
        "drop_last": data.drop_last,
    }


def expose_options(cls: type) -> type:
    """Class decorator: every ``TrainerConfig`` field as an attribute of ``cls`` that reads
    ``self.config`` (and, set, replaces it with a validated copy)."""

    def option(name: str) -> property:
        def get(self):
            return getattr(self.config, name)

        def set_(self, value):
            self.config = self.config.replace(**{name: value})

        return property(get, set_, doc=f"The ``{name}`` option (``self.config.{name}``).")

    for name in OPTION_NAMES:
        if name not in cls.__dict__:
            setattr(cls, name, option(name))
    return cls
