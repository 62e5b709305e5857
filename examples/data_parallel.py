"""Data parallel on every device: the digits MLP, with the batch split over a mesh.

The only change from a single-device script is ``Trainer(mesh=mesh)``: each batch of 64 is
split over the mesh's ``"data"`` axis, parameters and optimizer state are replicated, and
the jitted step computes global means, so the logs are those of one device. Validation
batches of any size work (here 100: a divisible part runs sharded, the rest replicated).

On a machine with one CPU the script asks XLA for 4 host devices, which must happen before
jax starts; on GPUs or TPUs it uses the real devices.

    python examples/data_parallel.py
    NNXFIT_FAST=1 python examples/data_parallel.py   # seconds, for the tests
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
from sklearn.datasets import load_digits  # noqa: E402

import nnxfit  # noqa: E402
from nnxfit.data import ArrayLoader  # noqa: E402

FAST = os.environ.get("NNXFIT_FAST") == "1"


class DigitsMLP(nnxfit.TrainModule):
    def __init__(self, *, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(64, 256, rngs=rngs)
        self.bn = nnx.BatchNorm(256, rngs=rngs)  # statistics over the global batch
        self.drop = nnx.Dropout(0.2, rngs=rngs)
        self.l2 = nnx.Linear(256, 10, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.drop(nnx.relu(self.bn(self.l1(x)))))

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


def main():
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    train, val = order[:1500], order[1500:]

    mesh = jax.make_mesh((jax.device_count(),), ("data",))  # every device on the batch axis
    trainer = nnxfit.Trainer(max_epochs=2 if FAST else 15, mesh=mesh, progress_bar=not FAST)
    module = DigitsMLP(rngs=nnx.Rngs(0))
    history = trainer.fit(
        module,
        # drop_last: every training batch must divide over the devices (1500 = 23 * 64 + 28)
        ArrayLoader((x[train], y[train]), 64, shuffle=True, drop_last=True),
        val_data=ArrayLoader((x[val], y[val]), 100),
    )
    spec = module.l1.kernel.get_value().sharding.spec
    print(
        f"result: val_accuracy={history.history['val_accuracy'][-1]:.4f} on "
        f"{jax.device_count()} devices, mesh {dict(mesh.shape)}, params replicated ({spec})"
    )


if __name__ == "__main__":
    main()
