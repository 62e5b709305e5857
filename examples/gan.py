"""A small GAN on scikit-learn's digits (8x8), with manual optimization: ``training_step``
updates the discriminator, then the generator, with the two ``nnx.Optimizer``s that
``self.optimizers()`` returns.

``automatic_optimization = False`` hands the update to the module: the Trainer still runs it
inside its jitted step (``steps_per_execution`` steps per call), checkpoints both optimizers'
states and resumes exactly; the noise comes from the module's own ``nnx.Rngs``. A callback
writes a grid of digits generated from fixed noise into the workdir at every epoch end.

    python examples/gan.py                # a few minutes on 2 CPU cores
    NNXFIT_FAST=1 python examples/gan.py  # seconds, for the tests

Writes ``runs/gan/samples_epoch_<n>.png`` (and checkpoints) under the current folder.
"""

import os

import jax
import matplotlib
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import nnxfit
from nnxfit.callbacks import ModelCheckpoint
from nnxfit.data import ArrayLoader

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

FAST = os.environ.get("NNXFIT_FAST") == "1"
WORKDIR = "runs/gan"
LATENT = 32
GEN = nnx.All(nnx.Param, nnx.PathContains("generator"))
DISC = nnx.All(nnx.Param, nnx.PathContains("discriminator"))


class GAN(nnxfit.TrainModule):
    automatic_optimization = False  # training_step applies its own updates
    trainable = {"disc": DISC, "gen": GEN}  # one filter per optimizer, disjoint

    def __init__(self, *, seed: int = 0):
        rngs = nnx.Rngs(params=seed)
        self.generator = nnx.Sequential(
            nnx.Linear(LATENT, 128, rngs=rngs),
            nnx.leaky_relu,
            nnx.Linear(128, 256, rngs=rngs),
            nnx.leaky_relu,
            nnx.Linear(256, 64, rngs=rngs),
            nnx.tanh,
        )
        self.discriminator = nnx.Sequential(
            nnx.Linear(64, 256, rngs=rngs),
            nnx.leaky_relu,
            nnx.Linear(256, 128, rngs=rngs),
            nnx.leaky_relu,
            nnx.Linear(128, 1, rngs=rngs),
        )
        self.rngs = nnx.Rngs(noise=seed + 1)  # a fresh draw every step, checkpointed

    def generate(self, z):
        return self.generator(z)

    def training_step(self, real):
        opt = self.optimizers()  # {"disc": nnx.Optimizer, "gen": nnx.Optimizer}
        n = real.shape[0]
        fake = jax.lax.stop_gradient(
            self.generate(jax.random.normal(self.rngs.noise(), (n, LATENT)))
        )

        def d_loss(m):
            real_logits = m.discriminator(real)[:, 0]
            fake_logits = m.discriminator(fake)[:, 0]
            return (
                optax.sigmoid_binary_cross_entropy(real_logits, 0.9).mean()  # smoothed labels
                + optax.sigmoid_binary_cross_entropy(fake_logits, 0.0).mean()
            )

        loss_d, grads = nnx.value_and_grad(d_loss, argnums=nnx.DiffState(0, DISC))(self)
        opt["disc"].update(self, grads)

        z = jax.random.normal(self.rngs.noise(), (n, LATENT))

        def g_loss(m):  # the non-saturating loss: make the updated critic say "real"
            return optax.sigmoid_binary_cross_entropy(
                m.discriminator(m.generate(z))[:, 0], 1.0
            ).mean()

        loss_g, grads = nnx.value_and_grad(g_loss, argnums=nnx.DiffState(0, GEN))(self)
        opt["gen"].update(self, grads)
        return loss_d + loss_g, {"loss_d": loss_d, "loss_g": loss_g}

    def configure_optimizers(self):
        adam = optax.adam(2e-4, b1=0.5)
        return {"disc": adam, "gen": adam}


class SampleGrid(nnxfit.Callback):
    """Writes an 8x8 grid of digits generated from the same noise at every epoch end."""

    def __init__(self, workdir: str, every: int = 1):
        self.z = jax.random.normal(jax.random.key(42), (64, LATENT))
        self.workdir, self.every = workdir, every
        self.paths: list[str] = []

    def on_train_epoch_end(self, trainer, module, epoch, logs):
        if (epoch + 1) % self.every:
            return
        images = (np.asarray(module.generate(self.z)) + 1.0) / 2.0  # tanh -> [0, 1] (ink)
        cells = np.pad(images.reshape(8, 8, 8, 8), ((0, 0), (0, 0), (1, 1), (1, 1)))
        grid = cells.transpose(0, 2, 1, 3).reshape(80, 80)  # 8 x 8 digits, blank borders
        grid = np.kron(grid, np.ones((5, 5)))  # 400 x 400 pixels
        os.makedirs(self.workdir, exist_ok=True)
        path = os.path.join(self.workdir, f"samples_epoch_{epoch + 1:03d}.png")
        plt.imsave(path, grid, cmap="gray_r", vmin=0.0, vmax=1.0)
        self.paths.append(path)


def main() -> str:
    x = load_digits().data.astype(np.float32) / 8.0 - 1.0  # (1797, 64), values in [-1, 1]
    grid = SampleGrid(WORKDIR, every=1 if FAST else 10)
    trainer = nnxfit.Trainer(
        max_epochs=2 if FAST else 300,
        limit_train_batches=4 if FAST else None,
        steps_per_execution=4 if FAST else 28,  # one call per epoch of 28 batches
        workdir=WORKDIR,
        callbacks=[grid, ModelCheckpoint(every_n_epochs=50)],
        log_every_n_steps=28 * 10,
    )
    history = trainer.fit(
        GAN(seed=0), ArrayLoader(x, batch_size=64, shuffle=True, seed=0, drop_last=True)
    )
    h = history.history
    print(
        f"result: loss_d={h['loss_d'][-1]:.3f} loss_g={h['loss_g'][-1]:.3f} after "
        f"{trainer.global_step} steps; wrote {grid.paths[-1]}"
    )
    return grid.paths[-1]


if __name__ == "__main__":
    main()
