"""Several optimizers and manual optimization (issue 15): steps/s of ``Trainer.fit`` against
the same training written by hand, in one process.

Two workloads on scikit-learn's digits (batch 64, 28 batches an epoch):

  manual   a GAN (MLP generator and discriminator, 64-256-128 wide) with
           ``automatic_optimization = False``: the discriminator's update, then the
           generator's, each an ``nnx.value_and_grad`` and an ``nnx.Optimizer.update``
  several  an MLP classifier (hidden 128) whose two layers have their own optimizer (SGD and
           Adam) and their own loss (cross-entropy, and it plus an L2 term)

Contenders per workload:

  A  the practical limit by hand: ``jax.jit`` over the split (model, optimizers) state,
     donated, the same step body (1.00x)
  E  ``Trainer.fit`` (no workdir, no progress bar), ``steps_per_execution`` 1 and 28, timed
     in steady state inside one fit (``common.Stopwatch``)

Best of ``--repeats``, contenders interleaved. The single-optimizer path is
``overhead.py``'s; ``step_hlo.py`` shows its program is unchanged.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/optimizers.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from common import Stopwatch, digits, full_batches  # noqa: E402
from flax import nnx  # noqa: E402

import nnxfit  # noqa: E402
from nnxfit.data import ArrayLoader  # noqa: E402

BATCH, LATENT = 64, 32
GEN = nnx.All(nnx.Param, nnx.PathContains("generator"))
DISC = nnx.All(nnx.Param, nnx.PathContains("discriminator"))
L1 = nnx.All(nnx.Param, nnx.PathContains("l1"))
L2 = nnx.All(nnx.Param, nnx.PathContains("l2"))


class GAN(nnxfit.TrainModule):
    automatic_optimization = False
    trainable = {"disc": DISC, "gen": GEN}

    def __init__(self):
        rngs = nnx.Rngs(0)
        self.generator = nnx.Sequential(
            nnx.Linear(LATENT, 128, rngs=rngs), nnx.leaky_relu,
            nnx.Linear(128, 256, rngs=rngs), nnx.leaky_relu,
            nnx.Linear(256, 64, rngs=rngs), nnx.tanh,
        )  # fmt: skip
        self.discriminator = nnx.Sequential(
            nnx.Linear(64, 256, rngs=rngs), nnx.leaky_relu,
            nnx.Linear(256, 128, rngs=rngs), nnx.leaky_relu,
            nnx.Linear(128, 1, rngs=rngs),
        )  # fmt: skip
        self.rngs = nnx.Rngs(noise=1)

    def play(self, real, opts):
        bce = optax.sigmoid_binary_cross_entropy
        z = jax.random.normal(self.rngs.noise(), (real.shape[0], LATENT))
        fake = jax.lax.stop_gradient(self.generator(z))

        def d_loss(m):
            return bce(m.discriminator(real), 1.0).mean() + bce(m.discriminator(fake), 0.0).mean()

        loss_d, g = nnx.value_and_grad(d_loss, argnums=nnx.DiffState(0, DISC))(self)
        opts["disc"].update(self, g)

        def g_loss(m):
            return bce(m.discriminator(m.generator(z)), 1.0).mean()

        loss_g, g = nnx.value_and_grad(g_loss, argnums=nnx.DiffState(0, GEN))(self)
        opts["gen"].update(self, g)
        return loss_d + loss_g

    def training_step(self, batch):
        return self.play(batch[0], self.optimizers())

    def configure_optimizers(self):
        return {"disc": optax.adam(2e-4, b1=0.5), "gen": optax.adam(2e-4, b1=0.5)}

    @staticmethod
    def txs():
        return {"disc": (optax.adam(2e-4, b1=0.5), DISC), "gen": (optax.adam(2e-4, b1=0.5), GEN)}


class TwoLayers(nnxfit.TrainModule):
    trainable = {"l1": L1, "l2": L2}

    def __init__(self):
        rngs = nnx.Rngs(0)
        self.l1 = nnx.Linear(64, 128, rngs=rngs)
        self.l2 = nnx.Linear(128, 10, rngs=rngs)

    def losses(self, batch):
        x, y = batch
        logits = self.l2(nnx.relu(self.l1(x)))
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return {"l1": ce + 1e-4 * jnp.sum(self.l1.kernel[...] ** 2), "l2": ce}

    def training_step(self, batch):
        return self.losses(batch)

    def configure_optimizers(self):
        return {"l1": optax.sgd(1e-2, momentum=0.9), "l2": optax.adam(1e-3)}

    @staticmethod
    def txs():
        return {"l1": (optax.sgd(1e-2, momentum=0.9), L1), "l2": (optax.adam(1e-3), L2)}


def hand_step(cls):
    """The step body as one would write it by hand for ``cls``."""
    if cls is GAN:
        return lambda m, opts, x, y: m.play(x, opts)

    def step(m, opts, x, y):
        grads = {}
        for name, (_, f) in cls.txs().items():
            _, grads[name] = nnx.value_and_grad(
                lambda m, n=name: m.losses((x, y))[n], argnums=nnx.DiffState(0, f)
            )(m)
        for name, g in grads.items():
            opts[name].update(m, g)
        return m.losses((x, y))["l2"]

    return step


def hand_jit(cls, batches):
    """A: jax.jit over the split (model, optimizers), donated."""
    model = cls()
    opts = {n: nnx.Optimizer(model, tx, wrt=f) for n, (tx, f) in cls.txs().items()}
    gdef, state = nnx.split((model, opts))
    body = hand_step(cls)

    def step(state, x, y):
        m, o = nnx.merge(gdef, state)
        loss = body(m, o, x, y)
        return nnx.state((m, o)), loss

    step = jax.jit(step, donate_argnums=0)
    holder, nb = [state], len(batches)

    def run(n: int) -> float:
        s, loss = holder[0], None
        t = time.perf_counter()
        for i in range(n):
            x, y = batches[i % nb]
            s, loss = step(s, x, y)
        jax.block_until_ready(loss)
        holder[0] = s
        return n / (time.perf_counter() - t)

    run(2 * nb)  # compile and warm up
    return run


def fit_rate(cls, x, y, steps: int, spe: int) -> float:
    sw = Stopwatch()
    epochs = 1 + -(-steps // (len(x) // BATCH))
    trainer = nnxfit.Trainer(
        max_epochs=epochs, steps_per_execution=spe, progress_bar=False, callbacks=[sw]
    )
    trainer.fit(cls(), ArrayLoader((x, y), batch_size=BATCH, shuffle=True, seed=0, drop_last=True))
    return sw.rate


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=1400)
    args = p.parse_args(argv)
    x, y = digits()
    x = (x * 2.0 - 1.0).astype(np.float32)  # [-1, 1], the GAN's tanh range
    n = (len(x) // BATCH) * BATCH
    x, y = x[:n], y[:n]
    batches = full_batches(x, y, BATCH)[2]
    print(
        f"jax {jax.__version__}, {jax.devices()[0].platform}; batch {BATCH}, best of {args.repeats}"
    )
    for name, cls in (("manual", GAN), ("several", TwoLayers)):
        hand = hand_jit(cls, batches)
        best = {"A": 0.0, "E spe=1": 0.0, "E spe=28": 0.0}
        for _ in range(args.repeats):
            best["A"] = max(best["A"], hand(args.steps))
            best["E spe=1"] = max(best["E spe=1"], fit_rate(cls, x, y, args.steps, 1))
            best["E spe=28"] = max(best["E spe=28"], fit_rate(cls, x, y, args.steps, 28))
        print(f"== {name}")
        for k, v in best.items():
            print(f"   {k:<10} {v:9.1f} steps/s  {v / best['A']:.3f}x")


if __name__ == "__main__":
    main()
