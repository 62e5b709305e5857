"""FSDP: parameters and optimizer state sharded over the devices, through nnx annotations.

Each big kernel says how it is split with ``nnx.with_partitioning``; the Trainer places it
so, gives Adam's moments the same sharding, and splits batches over the same ``"data"``
axis. The compiler gathers each kernel for the matmul and scatters its gradient back, so
every device holds about a quarter of the parameters and optimizer state, and the
numbers equal a single-device run. The summary printed at the start shows the bytes per
device.

Annotated models need a mesh with ``Auto`` axes (the compiler places the collectives);
with ``Explicit`` axes the model must say how each matmul's output is sharded.

    python examples/fsdp.py
    NNXFIT_FAST=1 python examples/fsdp.py   # seconds, for the tests
"""

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    )

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import nnxfit  # noqa: E402
from nnxfit.callbacks.summary import ModelSummary  # noqa: E402
from nnxfit.data import ArrayLoader  # noqa: E402

FAST = os.environ.get("NNXFIT_FAST") == "1"


def sharded(spec):
    """A kernel initializer that records how the kernel is split over the mesh."""
    return nnx.with_partitioning(nnx.initializers.lecun_normal(), spec)


class ShardedMLP(nnxfit.TrainModule):
    def __init__(self, *, rngs: nnx.Rngs):
        # Split each kernel along its larger dimension; small biases stay replicated.
        self.l1 = nnx.Linear(64, 512, kernel_init=sharded((None, "data")), rngs=rngs)
        self.l2 = nnx.Linear(512, 512, kernel_init=sharded(("data", None)), rngs=rngs)
        self.l3 = nnx.Linear(512, 10, kernel_init=sharded(("data", None)), rngs=rngs)

    def __call__(self, x):
        return self.l3(nnx.relu(self.l2(nnx.relu(self.l1(x)))))

    def training_step(self, batch):
        x, y = batch
        logits = self(x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, {"accuracy": (logits.argmax(-1) == y).mean()}

    def validation_step(self, batch):
        x, y = batch
        logits = self(x)
        return {
            "loss": optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(),
            "accuracy": (logits.argmax(-1) == y).mean(),
        }

    def configure_optimizers(self):
        return optax.adamw(1e-3)


def device_bytes(tree, device) -> int:
    return sum(
        s.data.nbytes
        for x in jax.tree.leaves(tree)
        for s in x.addressable_shards
        if s.device == device
    )


def main():
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(x))
    train, val = order[:1500], order[1500:]

    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,))
    with jax.set_mesh(mesh):  # annotated variables are created sharded (eager sharding)
        module = ShardedMLP(rngs=nnx.Rngs(0))
    trainer = nnxfit.Trainer(
        max_epochs=2 if FAST else 10,
        mesh=mesh,
        progress_bar=not FAST,
        callbacks=[ModelSummary()],
    )
    history = trainer.fit(
        module,
        ArrayLoader((x[train], y[train]), 64, shuffle=True, drop_last=True),
        val_data=ArrayLoader((x[val], y[val]), 100),
    )
    state = trainer.train_state()
    dev = jax.devices()[0]
    mb = {
        name: (
            sum(a.nbytes for a in jax.tree.leaves(state[name])) / 1e6,
            device_bytes(state[name], dev) / 1e6,
        )
        for name in ("params", "opt")
    }
    print(
        f"result: val_accuracy={history.history['val_accuracy'][-1]:.4f}; per device of {n}: "
        f"params {mb['params'][1]:.2f} of {mb['params'][0]:.2f} MB, optimizer state "
        f"{mb['opt'][1]:.2f} of {mb['opt'][0]:.2f} MB "
        f"(l2 kernel {module.l2.kernel.get_value().sharding.spec})"
    )


if __name__ == "__main__":
    main()
