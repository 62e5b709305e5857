"""Where arrays live: one device by default, a ``jax.sharding.Mesh`` when the Trainer has one."""

from __future__ import annotations

from typing import Any

import jax


class Placement:
    """Puts batches and state on devices. The single-device case does nothing at all:
    numpy batches go straight into the jitted call, which is the cheapest transfer there is.
    """

    def __init__(self, mesh: jax.sharding.Mesh | None = None):
        self.mesh = mesh

    @property
    def is_sharded(self) -> bool:
        return self.mesh is not None

    def put_batch(self, leaves: list, stacked_dims: int = 0) -> list:
        return leaves

    def put_state(self, tree: Any, variables: Any = None) -> Any:
        return tree

    def check_batch_size(self, n: int, where: str) -> None:
        pass
