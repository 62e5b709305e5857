"""Workarounds for two host-memory leaks in the TensorStore calls orbax makes for every save.

Both are in TensorStore's Python bindings (0.1.86): objects they return are never freed.
Measured standalone, in a bare process (20,000 calls, RSS after ``gc`` and ``malloc_trim``):

* ``tensorstore.KvStore.Spec(spec).to_json()``: ~700 B per call. Orbax's
  ``tensorstore_utils._build_ocdbt_kvstore_tspec`` calls it once per array and per OCDBT merge
  to resolve a base kvstore spec: 28 calls per checkpoint of the small MLP of
  ``benchmarks/checkpoint_memory.py``. For a local ``file`` driver spec (the only kind nnxfit
  writes) the resolved spec is the spec itself, so the orbax module gets a ``tensorstore``
  whose ``KvStore.Spec`` answers ``to_json`` for such specs without the binding, and hands
  TensorStore a real spec everywhere else (``KvStore.open``).
* ``tensorstore.experimental_collect_matching_metrics``: ~1.6 KB per call (more the more
  metrics a process has registered). Orbax reads TensorStore's byte counters with it twice per
  array item saved or restored, only to emit ``jax.monitoring`` throughput events nnxfit does
  not use; with no initial count orbax skips them (``jax_array_handlers._record_raw_metrics``).

``install`` applies both, once, to the whole process, when nnxfit first imports orbax.
"""

from __future__ import annotations

from typing import Any

_originals: dict[str, Any] = {}


def install() -> None:
    if _originals:
        return
    try:
        import tensorstore
        from orbax.checkpoint._src.serialization import tensorstore_utils
    except ImportError:  # pragma: no cover - orbax-checkpoint is pinned
        return
    _originals.update(vars(tensorstore_utils))
    if hasattr(tensorstore_utils, "get_tensorstore_raw_bytes"):
        tensorstore_utils.get_tensorstore_raw_bytes = _no_raw_bytes
    if getattr(tensorstore_utils, "ts", None) is tensorstore:
        tensorstore_utils.ts = _TensorStore()


def uninstall() -> None:
    """Puts orbax back as it was (``benchmarks/checkpoint_memory.py`` measures both)."""
    from orbax.checkpoint._src.serialization import tensorstore_utils

    for name in ("get_tensorstore_raw_bytes", "ts"):
        if name in _originals:
            setattr(tensorstore_utils, name, _originals[name])


def _no_raw_bytes(direction: Any = None) -> None:
    return None


class _FileSpec:
    """``tensorstore.KvStore.Spec(spec)`` for orbax: ``to_json`` of a local file spec is the
    spec itself; anything else goes to TensorStore."""

    def __init__(self, spec: Any):
        self.spec = spec

    def real(self):
        import tensorstore

        return tensorstore.KvStore.Spec(self.spec)

    def to_json(self, *args: Any, **kwargs: Any) -> Any:
        if not args and not kwargs and _is_local_file(self.spec):
            return dict(self.spec)
        return self.real().to_json(*args, **kwargs)


def _is_local_file(spec: Any) -> bool:
    return (
        isinstance(spec, dict)
        and set(spec) == {"driver", "path"}
        and spec["driver"] == "file"
        and isinstance(spec["path"], str)
        and spec["path"].startswith("/")
    )


class _KvStore:
    Spec = _FileSpec

    @staticmethod
    def open(spec: Any, *args: Any, **kwargs: Any):
        import tensorstore

        if isinstance(spec, _FileSpec):
            spec = spec.real()
        return tensorstore.KvStore.open(spec, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        import tensorstore

        return getattr(tensorstore.KvStore, name)


class _TensorStore:
    """The ``tensorstore`` module as orbax's ``tensorstore_utils`` sees it."""

    KvStore = _KvStore()

    def __getattr__(self, name: str) -> Any:
        import tensorstore

        return getattr(tensorstore, name)
