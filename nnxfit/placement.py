"""Where arrays live: one device by default, a ``jax.sharding.Mesh`` when the Trainer has one.

On a mesh, everything is plain ``jax.sharding``: batches get a ``NamedSharding`` that splits
their batch axis over the mesh's ``"data"`` axis; module state follows the variables' own nnx
annotations (``nnx.with_partitioning`` / ``out_sharding=`` metadata) and is replicated where
there is none; optimizer state takes the sharding of the parameter it mirrors. The jitted
step then computes global reductions by itself, so losses, metrics and gradients equal the
single-device ones.

Several processes (``jax.distributed.initialize``): each process's loader yields its own part
of the global batch, which ``jax.make_array_from_process_local_data`` assembles; module state
must be identical on every process (same seed), as with any SPMD program.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nnxfit.errors import BatchError, ConfigError

DATA_AXIS = "data"


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


class Placement:
    """Puts batches and state on devices. The single-device case does nothing at all:
    numpy batches go straight into the jitted call, which is the cheapest transfer there is.
    """

    def __init__(self, mesh: Mesh | None = None):
        self.mesh = mesh
        if mesh is None:
            return
        if not isinstance(mesh, Mesh):
            raise ConfigError(
                f"mesh must be a jax.sharding.Mesh; got {type(mesh).__name__}. Build one with "
                "jax.make_mesh((jax.device_count(),), ('data',))."
            )
        if DATA_AXIS not in mesh.axis_names:
            raise ConfigError(
                f"mesh has axes {tuple(mesh.axis_names)} but nnxfit splits batches over an axis "
                f"named {DATA_AXIS!r}; name the batch axis 'data', e.g. "
                "jax.make_mesh((4,), ('data',)) or jax.make_mesh((2, 2), ('data', 'model'))."
            )
        self.data_size = int(mesh.shape[DATA_AXIS])
        self.replicated = NamedSharding(mesh, P())
        pids = np.vectorize(lambda d: d.process_index)(mesh.devices)
        self.multiprocess = bool((pids != pids.flat[0]).any())
        # Distinct slices of the data axis held by this process: the loader's batch is this
        # process's part of the global batch and must divide over them.
        here = np.argwhere(pids == jax.process_index())
        self.local_data_shards = len(set(here[:, mesh.axis_names.index(DATA_AXIS)].tolist()))
        if self.local_data_shards == 0:
            raise ConfigError(
                f"the mesh holds no device of this process (process {jax.process_index()}); "
                "build it from jax.devices(), which lists the devices of every process."
            )
        self._batch_shardings: dict[int, NamedSharding] = {}

    @property
    def is_sharded(self) -> bool:
        return self.mesh is not None

    # -- batches ---------------------------------------------------------------------------
    def batch_sharding(self, stacked_dims: int = 0) -> NamedSharding:
        """Splits axis ``stacked_dims`` (the batch axis after any stacking axes) over 'data'."""
        s = self._batch_shardings.get(stacked_dims)
        if s is None:
            s = NamedSharding(self.mesh, P(*([None] * stacked_dims), DATA_AXIS))
            self._batch_shardings[stacked_dims] = s
        return s

    def check_batch_size(self, n: int | None, where: str) -> None:
        if self.mesh is None or n is None:
            return
        k = self.local_data_shards
        if n % k:
            lo, hi = n // k * k, -(-n // k) * k
            if self.multiprocess:
                what = (
                    f"this process's {where} batch of {n} examples does not divide over its "
                    f"{k} slices of the mesh's 'data' axis (size {self.data_size} across "
                    f"{jax.process_count()} processes)"
                )
            else:
                what = (
                    f"a {where} batch of {n} examples does not divide over the mesh's 'data' "
                    f"axis of size {self.data_size}"
                )
            suggest = f"{hi}" if lo == 0 else f"{lo} or {hi}"
            raise BatchError(
                f"{what}. Use a batch size that is a multiple of {k} (e.g. {suggest}); for a "
                "short last batch, pass drop_last=True to the ArrayLoader."
            )

    def put_batch(self, leaves: list, stacked_dims: int = 0) -> list:
        """Places a training batch's leaves; their axis ``stacked_dims`` is the batch axis."""
        if self.mesh is None:
            return leaves
        self.check_batch_size(int(leaves[0].shape[stacked_dims]), "train")
        sharding = self.batch_sharding(stacked_dims)
        if not self.multiprocess:
            return jax.device_put(leaves, sharding)
        return [jax.make_array_from_process_local_data(sharding, x) for x in leaves]

    # -- state -----------------------------------------------------------------------------
    def put_state(self, tree: Any, variables: Any = None) -> Any:
        """Places ``tree`` (arrays, or one array) after ``variables`` (the matching
        ``nnx.Variable`` state, or one Variable): annotated ones sharded as annotated, the rest
        replicated. Without ``variables`` everything is replicated."""
        if self.mesh is None:
            return tree
        flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
        if variables is None:
            shardings = [self.replicated] * len(flat)
        else:
            vars_ = jax.tree.leaves(variables, is_leaf=_is_var)
            if len(vars_) != len(flat):
                raise ValueError(
                    f"put_state got {len(flat)} arrays but {len(vars_)} variables; pass the "
                    "nnx.Variable state the arrays came from."
                )
            shardings = [self.sharding_of(v, p) for (p, _), v in zip(flat, vars_, strict=True)]
        out = [self._put(x, s, p) for (p, x), s in zip(flat, shardings, strict=True)]
        return treedef.unflatten(out)

    def sharding_of(self, var: Any, path: tuple = ()) -> NamedSharding:
        """The sharding a Variable asks for on this mesh (replicated without annotation)."""
        if not _is_var(var) or not var.has_metadata("out_sharding"):
            return self.replicated
        spec = nnx.get_partition_spec(var).get_value()
        if not isinstance(spec, P) or spec == P():
            return self.replicated
        names = [a for part in spec for a in (part if isinstance(part, tuple) else (part,))]
        unknown = [a for a in names if a is not None and a not in self.mesh.axis_names]
        if unknown:
            where = jax.tree_util.keystr(path) or type(var).__name__
            raise ConfigError(
                f"variable {where} is annotated with {spec} but the mesh has axes "
                f"{tuple(self.mesh.axis_names)}; {unknown} name no mesh axis. Use mesh axis "
                "names in nnx.with_partitioning, or map logical names with "
                "sharding_rules / nnx.logical_axis_rules."
            )
        return NamedSharding(self.mesh, spec)

    def _put(self, x: Any, sharding: NamedSharding, path: tuple) -> jax.Array:
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        try:
            if not self.multiprocess:
                return jax.device_put(x, sharding)
            return _put_global(x, sharding)
        except ValueError as e:
            where = jax.tree_util.keystr(path) or "array"
            raise ConfigError(
                f"cannot place {where} of shape {tuple(np.shape(x))} with {sharding.spec} on "
                f"mesh {dict(self.mesh.shape)}: {e}. Sharded dimensions must divide by the "
                "size of their mesh axes."
            ) from e

    def put_carry(self, leaves: list) -> list:
        """The train state's leaves with every one not yet on the mesh (counters, metric
        sums) replicated; the train programs are built to return them with these shardings
        (``step.Programs``)."""
        if self.mesh is None:
            return leaves
        out = []
        for x in leaves:
            s = getattr(x, "sharding", None)
            on_mesh = isinstance(s, NamedSharding) and s.mesh == self.mesh and x.committed
            out.append(x if on_mesh else self._put(x, self.replicated, ()))
        return out

    def init_optimizer(self, tx: Any, params: Any) -> Any:
        """``tx.init(params)`` with every optimizer leaf that mirrors a parameter (same path
        suffix and shape: Adam's moments, accumulated gradients) sharded like that parameter,
        and the rest (counts, schedules' state) replicated."""
        if self.mesh is None:
            return tx.init(params)
        by_path = {
            tuple(p): (x.shape, x.sharding)
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
        }

        def pick(path, s):
            path = tuple(path)
            for i in range(len(path)):
                hit = by_path.get(path[i:])
                if hit is not None and hit[0] == s.shape:
                    return hit[1]
            return self.replicated

        shapes = jax.eval_shape(tx.init, params)
        shardings = jax.tree_util.tree_map_with_path(pick, shapes)
        return jax.jit(tx.init, out_shardings=shardings)(params)

    # -- validation and predict ------------------------------------------------------------
    def eval_parts(self, batch: Any) -> list[EvalPart]:
        """A validation or predict batch of any size, as placed parts.

        ``validation_step`` returns batch means, so padding would bias them and no mask can
        undo that. Instead the largest part that divides over the 'data' axis runs sharded,
        and the remainder (fewer examples than data slices) runs replicated; the eval step
        weighs each part by its example count, so the means equal the single-device ones.
        """
        if self.mesh is None:
            return [EvalPart(batch, jax.device_get)]
        leaves, treedef = jax.tree.flatten(batch)
        n = int(leaves[0].shape[0])
        if self.multiprocess:
            return self._eval_parts_multiprocess(leaves, treedef, n)
        m = n // self.local_data_shards * self.local_data_shards
        parts = []
        if m:
            head = jax.device_put([x[:m] for x in leaves], self.batch_sharding())
            parts.append(EvalPart(treedef.unflatten(head), jax.device_get))
        if m < n:
            tail = jax.device_put([x[m:] for x in leaves], self.replicated)
            parts.append(EvalPart(treedef.unflatten(tail), jax.device_get))
        return parts

    def _eval_parts_multiprocess(self, leaves: list, treedef: Any, n: int) -> list[EvalPart]:
        from jax.experimental import multihost_utils

        # Processes may hold batches of different sizes (an uneven last batch): agree on the
        # sharded part first, then gather every process's remainder to every process.
        sizes = np.asarray(multihost_utils.process_allgather(np.int32(n))).reshape(-1)
        k = self.local_data_shards
        m = int(sizes.min()) // k * k
        parts = []
        if m:
            sharding = self.batch_sharding()
            head = [
                jax.make_array_from_process_local_data(sharding, np.asarray(x[:m])) for x in leaves
            ]
            global_n = head[0].shape[0]
            index = sharding.addressable_devices_indices_map((global_n,))
            starts = sorted({idx[0].indices(global_n)[:2] for idx in index.values()})
            mine = np.concatenate([np.arange(a, b) for a, b in starts])
            parts.append(EvalPart(treedef.unflatten(head), self._gathered_rows(mine)))
        rests = sizes - m
        if rests.max() > 0:
            width = int(rests.max())
            tail = []
            for x in leaves:
                x = np.asarray(x[m:])
                pad = np.zeros((width - x.shape[0], *x.shape[1:]), x.dtype)
                g = np.asarray(multihost_utils.process_allgather(np.concatenate([x, pad])))
                full = np.concatenate([g[p, : int(r)] for p, r in enumerate(rests)])
                tail.append(_put_global(full, self.replicated))
            off = int(rests[: jax.process_index()].sum())
            mine = np.arange(off, off + n - m)
            parts.append(EvalPart(treedef.unflatten(tail), self._gathered_rows(mine)))
        return parts

    @staticmethod
    def _gathered_rows(rows: np.ndarray) -> Callable[[Any], Any]:
        """Output of a part spanning processes -> host rows of this process's examples."""

        def take(out):
            from jax.experimental import multihost_utils

            full = multihost_utils.process_allgather(out, tiled=True)
            return jax.tree.map(lambda a: np.asarray(a)[rows], full)

        return take


@dataclass
class EvalPart:
    """A placed piece of a validation or predict batch."""

    batch: Any
    rows: Callable[[Any], Any]  # predict output of this part -> this process's host rows


def _put_global(x: Any, sharding: NamedSharding) -> jax.Array:
    """Places a value every process holds in full onto a sharding spanning processes."""
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
        impl = jax.random.key_impl(x)
        data = _put_global(jax.random.key_data(x), sharding)
        wrap = jax.jit(lambda d: jax.random.wrap_key_data(d, impl=impl), out_shardings=sharding)
        return wrap(data)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
