"""``TrainModule.hparams``: the module's own hyperparameters, as plain data.

(Not the optimizer's hyperparameters, which ``nnxfit.hyperparams`` reads and sets.)

``self.save_hyperparameters()`` in a ``TrainModule``'s ``__init__`` fills ``self.hparams``
from the constructor's arguments, as Lightning's does: the arguments of every ``__init__``
on the call stack that belongs to this object (a subclass's and the ``super().__init__`` it
calls), ``**kwargs`` entries as keys of their own, minus ``self`` and the names in
``ignore``. ``save_hyperparameters("lr", "depth")`` keeps only those names;
``save_hyperparameters({"lr": 1e-3})`` (or an ``argparse.Namespace``) takes that mapping.

Values are stored as plain data, so that they can go into checkpoints (JSON), ``hparams.yaml``
and every tracker: numbers, strings, bools, ``None``, and lists and dicts of them are kept as
they are (tuples become lists, numpy scalars Python numbers, small arrays lists, paths
strings). Anything else (an ``nnx.Rngs``, a module, a function, a large array) is stored as a
short description string, its ``repr`` when that is one short line, else ``<type name>``:
the value itself is not kept.

``hparams`` is an ``HParams``, a dict with attribute access (``self.hparams.lr``). It lives
on the module as a static attribute, so it is part of the module's graph definition: it is
there inside the jitted ``training_step`` too. ``HParams`` is hashable (by its content), as
``nnx.jit`` needs for every static attribute.

Where it goes (``hparams.yaml``, checkpoints, trackers): see the README, "Hyperparameters".
"""

from __future__ import annotations

import argparse
import enum
import inspect
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from nnxfit.errors import ConfigError

HPARAMS_FILE = "hparams.yaml"
_SMALL_ARRAY = 64  # arrays up to this many elements are kept as (nested) lists
_SHORT_REPR = 120


class HParams(dict):
    """A dict of plain data with attribute access; hashable by its content."""

    __slots__ = ()

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.update(*args, **kwargs)

    def __setitem__(self, key, value) -> None:
        super().__setitem__(str(key), plain(value))

    def update(self, *args, **kwargs) -> None:  # type: ignore[override]
        for k, v in dict(*args, **kwargs).items():
            self[k] = v

    def setdefault(self, key, default=None):  # type: ignore[override]
        if key not in self:
            self[key] = default
        return self[key]

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(
                f"hparams has no {name!r}; it holds {sorted(self)}. Fill it with "
                "self.save_hyperparameters() in __init__, or set self.hparams[name] = value."
            ) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(json.dumps(self, sort_keys=True, default=repr))

    def __repr__(self) -> str:
        return f"HParams({dict.__repr__(self)})"

    def __reduce__(self):
        return (HParams, (dict(self),))

    def to_dict(self) -> dict:
        """A plain ``dict`` copy (what YAML and JSON writers take)."""
        return json.loads(json.dumps(self))


def plain(value: Any) -> Any:
    """``value`` as plain data (see the module docstring)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, enum.Enum):
        return plain(value.value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, argparse.Namespace):
        return plain(vars(value))
    shape = getattr(value, "shape", None)
    if isinstance(shape, tuple) and hasattr(value, "dtype") and hasattr(value, "tolist"):
        size = int(np.prod(shape)) if shape else 1
        if size <= _SMALL_ARRAY and not _is_key(value):
            try:
                return value.tolist()
            except Exception:  # a deleted or non-addressable array: describe it
                pass
        return f"<{value.dtype}{list(shape)} {type(value).__name__}>"
    return describe(value)


def describe(value: Any) -> str:
    """A short string standing for an object that is not plain data."""
    try:
        text = repr(value)
    except Exception:
        text = ""
    if text and "\n" not in text and len(text) <= _SHORT_REPR:
        return text
    return f"<{type(value).__module__}.{type(value).__qualname__}>"


def _is_key(value: Any) -> bool:
    try:
        import jax

        return jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key)
    except Exception:
        return False


def init_args(obj: Any, frame) -> dict[str, Any]:
    """The arguments of every ``__init__`` of ``obj`` on the stack from ``frame`` outwards;
    an outer frame's (the subclass's) value wins over an inner one's."""
    frames = []
    while frame is not None:
        code = frame.f_code
        if code.co_name == "__init__" and frame.f_locals.get("self", None) is obj:
            frames.append(frame)
        elif frames:
            break  # past the constructor calls of this object
        frame = frame.f_back
    if not frames:
        raise ConfigError(
            "save_hyperparameters() found no __init__ of this module on the call stack; call "
            "it inside __init__, or pass the values: self.save_hyperparameters({'lr': 1e-3})."
        )
    out: dict[str, Any] = {}
    for frame in frames:  # innermost first: outer frames override
        code, local = frame.f_code, frame.f_locals
        n = code.co_argcount + code.co_kwonlyargcount
        names = list(code.co_varnames[:n])
        for name in names:
            if name in local:
                out[name] = local[name]
        if code.co_flags & inspect.CO_VARARGS:
            name = code.co_varnames[n]
            if local.get(name):
                out[name] = list(local[name])
            n += 1
        if code.co_flags & inspect.CO_VARKEYWORDS:
            out.update(local.get(code.co_varnames[n]) or {})
    out.pop("self", None)
    out.pop("__class__", None)
    return out


def collect(obj: Any, args: tuple, ignore, frame) -> dict[str, Any]:
    """What ``save_hyperparameters(*args, ignore=...)`` called from ``frame`` saves."""
    ignore = {ignore} if isinstance(ignore, str) else set(ignore or ())
    if len(args) == 1 and isinstance(args[0], Mapping | argparse.Namespace):
        values = dict(vars(args[0]) if isinstance(args[0], argparse.Namespace) else args[0])
    else:
        found = init_args(obj, frame)
        if args:
            bad = [a for a in args if not isinstance(a, str)]
            if bad:
                raise ConfigError(
                    f"save_hyperparameters takes argument names (strings) or one dict; got "
                    f"{bad[0]!r}. Write self.save_hyperparameters('lr', 'depth') or "
                    "self.save_hyperparameters({'lr': lr})."
                )
            missing = [a for a in args if a not in found]
            if missing:
                raise ConfigError(
                    f"save_hyperparameters: {missing} are not arguments of __init__ (it has "
                    f"{sorted(found)})."
                )
            found = {a: found[a] for a in args}
        values = found
    return {k: v for k, v in values.items() if k not in ignore}


def of(module: Any) -> dict:
    """The module's hparams as a plain dict ({} for a module without any)."""
    hp = vars(module).get("hparams") if module is not None and hasattr(module, "__dict__") else None
    return hp.to_dict() if isinstance(hp, HParams) else {}


def flatten(d: Mapping, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Nested dicts as one level: ``{"trainer": {"seed": 0}}`` -> ``{"trainer.seed": 0}``;
    lists become their JSON text (trackers' parameter tables hold scalars)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key, sep))
        elif isinstance(v, list | tuple | Mapping):
            out[key] = json.dumps(plain(v))
        else:
            out[key] = v
    return out


def write_file(trainer) -> str | None:
    """Writes the fitted module's hparams to ``workdir/hparams.yaml`` (process 0, a workdir,
    not ``fast_dev_run``, hparams not empty); returns the path written."""
    hp = of(getattr(trainer, "module", None))
    workdir = trainer.workdir
    if not hp or workdir is None or trainer.fast_dev_run or not trainer.is_global_zero:
        return None
    import yaml

    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, HPARAMS_FILE)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(hp, f, sort_keys=False, default_flow_style=False)
    os.replace(tmp, path)
    return path


def read_file(folder: str | os.PathLike) -> dict:
    """``folder/hparams.yaml`` as a dict ({} when there is none)."""
    path = os.path.join(folder, HPARAMS_FILE)
    if not os.path.isfile(path):
        return {}
    import yaml

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    return data if isinstance(data, dict) else {}
