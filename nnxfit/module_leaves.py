"""Handles on every array a module's state holds, to read and write them in place.

``nnx.split`` lists a module's state as ``nnx.Variable``s (``Param``, ``BatchStat``, RNG
state, custom subclasses) and, since flax 0.12, as plain arrays: a ``jax.Array`` or numpy
attribute (a constant table, a mask, a positional encoding), or one inside an ``nnx.data``
list, dict or tuple, is pytree data. A Variable is written in place with ``set_raw_value``;
a plain array has no object of its own, so its handle writes the attribute (or item) of the
node that holds it. Tuples cannot be written in place: the tuple is rebuilt with the new
value and set on its own holder.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from flax.nnx import graphlib


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _key(entry: Any) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return entry


class AttributeLeaf:
    """A plain array in a module, at ``path`` (keys from the root): ``get_raw_value`` /
    ``set_raw_value`` as a Variable's."""

    __slots__ = ("root", "path")

    def __init__(self, root: Any, path: tuple):
        self.root, self.path = root, path

    def _chain(self) -> list[tuple[Any, Any]]:
        """(node, key) from the root down to the leaf's holder."""
        chain, node = [], self.root
        for k in self.path:
            chain.append((node, k))
            node = graphlib.get_node_impl(node).node_dict(node)[k]
        return chain

    def get_raw_value(self) -> Any:
        node, key = self._chain()[-1]
        return graphlib.get_node_impl(node).node_dict(node)[key]

    def set_raw_value(self, value: Any) -> None:
        chain = self._chain()
        while chain:
            node, key = chain.pop()
            impl = graphlib.get_node_impl(node)
            if impl.set_key is not None:
                impl.set_key(node, key, value)
                return
            # An immutable node (a tuple): a copy holding the new value replaces it above.
            pairs, aux = impl.flatten(node)
            value = impl.unflatten([(k, value if k == key else v) for k, v in pairs], aux)
        raise TypeError(f"cannot write the module attribute at {self.path}: no mutable holder.")

    def __repr__(self) -> str:
        return f"AttributeLeaf({'/'.join(map(str, self.path))})"


def live_leaves(module: Any, *states: Any) -> list:
    """One handle per leaf of ``states`` (``nnx.split(module, ...)`` results), in
    ``jax.tree.leaves`` order of their pure values: the Variable itself, or an
    ``AttributeLeaf`` for a plain array."""
    out = []
    for state in states:
        for path, leaf in jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_var)[0]:
            out.append(leaf if _is_var(leaf) else AttributeLeaf(module, tuple(map(_key, path))))
    return out
