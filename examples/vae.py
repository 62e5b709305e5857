"""A variational autoencoder on scikit-learn's digits, with its noise drawn inside
``training_step`` from the module's own ``nnx.Rngs``.

The reparameterisation noise comes from ``self.rngs.noise()``: the RNG state is part of the
module, so the Trainer carries it through the jitted step like BatchNorm statistics (a fresh
key every step, saved in checkpoints, no key plumbing). The end writes a PNG with originals,
their reconstructions and new digits decoded from the prior.

    python examples/vae.py                # about half a minute on 2 CPU cores
    NNXFIT_FAST=1 python examples/vae.py  # seconds, for the tests

Writes ``runs/vae/reconstructions.png`` under the current folder.
"""

import os

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import nnxfit
from nnxfit.data import ArrayLoader

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

FAST = os.environ.get("NNXFIT_FAST") == "1"
WORKDIR = "runs/vae"
LATENT = 8


class VAE(nnxfit.TrainModule):
    def __init__(self, *, seed: int = 0):
        rngs = nnx.Rngs(params=seed)
        self.encoder = nnx.Sequential(
            nnx.Linear(64, 256, rngs=rngs), nnx.relu, nnx.Linear(256, 2 * LATENT, rngs=rngs)
        )
        self.decoder = nnx.Sequential(
            nnx.Linear(LATENT, 256, rngs=rngs), nnx.relu, nnx.Linear(256, 64, rngs=rngs)
        )
        self.rngs = nnx.Rngs(noise=seed + 1)  # drawn in training_step; advances every step

    def encode(self, x):
        mean, log_var = jnp.split(self.encoder(x), 2, axis=-1)
        return mean, log_var

    def decode(self, z):
        return nnx.sigmoid(self.decoder(z))

    def elbo_terms(self, x):
        mean, log_var = self.encode(x)
        eps = jax.random.normal(self.rngs.noise(), mean.shape)
        logits = self.decoder(mean + jnp.exp(0.5 * log_var) * eps)
        # Pixel intensities in [0, 1] as Bernoulli probabilities; sums over the 64 pixels.
        recon = optax.sigmoid_binary_cross_entropy(logits, x).sum(-1).mean()
        kl = (0.5 * (jnp.exp(log_var) + mean**2 - 1.0 - log_var)).sum(-1).mean()
        return recon, kl

    def training_step(self, batch):
        recon, kl = self.elbo_terms(batch)
        return recon + kl, {"recon": recon, "kl": kl}

    def validation_step(self, batch):
        recon, kl = self.elbo_terms(batch)
        return {"loss": recon + kl, "recon": recon, "kl": kl}

    def predict_step(self, batch):
        mean, _ = self.encode(batch)
        return self.decode(mean)

    def configure_optimizers(self):
        return optax.adam(1e-3)


def save_figure(originals, reconstructions, samples, path):
    rows = [("original", originals), ("reconstruction", reconstructions), ("from prior", samples)]
    fig, axes = plt.subplots(3, len(originals), figsize=(len(originals), 3.4))
    for r, (title, images) in enumerate(rows):
        for c, image in enumerate(images):
            axes[r, c].imshow(image.reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
            axes[r, c].axis("off")
        axes[r, 0].set_title(title, fontsize=8, loc="left")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main() -> float:
    x = (load_digits().data / 16.0).astype(np.float32)  # (1797, 64), values in [0, 1]
    order = np.random.default_rng(0).permutation(len(x))
    val, train = x[order[:300]], x[order[300:]]
    module = VAE(seed=0)
    trainer = nnxfit.Trainer(
        max_epochs=2 if FAST else 60,
        limit_train_batches=5 if FAST else None,
        log_every_n_steps=20,
    )
    history = trainer.fit(
        module,
        ArrayLoader(train, batch_size=64, shuffle=True, seed=0),
        val_data=ArrayLoader(val, batch_size=300),
    )
    # One fresh noise key per training step, drawn from the module's own RNG stream.
    assert int(module.rngs.noise.count[...]) == trainer.global_step

    originals = val[:10]
    reconstructions = trainer.predict(module, ArrayLoader(originals, batch_size=10))
    z = jax.random.normal(jax.random.key(1), (10, LATENT))
    samples = np.asarray(module.decode(z))
    os.makedirs(WORKDIR, exist_ok=True)
    path = os.path.join(WORKDIR, "reconstructions.png")
    save_figure(originals, reconstructions, samples, path)
    loss = history.history["val_loss"][-1]
    print(
        f"result: val_loss={loss:.2f} nats per image (recon "
        f"{history.history['val_recon'][-1]:.2f} + kl {history.history['val_kl'][-1]:.2f}); "
        f"wrote {path}"
    )
    return loss


if __name__ == "__main__":
    main()
