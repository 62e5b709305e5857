"""A small transformer language model on the Python standard library's own source code.

Characters (bytes) of a few stdlib ``.py`` files are the corpus: it ships with every Python,
so the example needs no download. Two pre-norm transformer blocks with ``nnx.MultiHeadAttention``
and a causal mask predict the next byte; the last 10 % of the text is held out. The end prints
the validation perplexity (``exp(val_loss)``) and a sample generated from the trained model.

    python examples/char_lm.py                # about a minute on 2 CPU cores
    NNXFIT_FAST=1 python examples/char_lm.py  # seconds, for the tests
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import nnxfit
from nnxfit.data import ArrayLoader

FAST = os.environ.get("NNXFIT_FAST") == "1"
FILES = [
    "textwrap.py",
    "string.py",
    "heapq.py",
    "shlex.py",
    "queue.py",
    "argparse.py",
    "dataclasses.py",
    "functools.py",
    "random.py",
    "statistics.py",
    "fractions.py",
    "contextlib.py",
    "csv.py",
    "enum.py",
]  # about 550 kB of Python
SEQ = 64  # context length
VOCAB = 256  # bytes


def corpus() -> list[np.ndarray]:
    stdlib = os.path.dirname(os.__file__)
    texts = []
    for name in FILES:
        with open(os.path.join(stdlib, name), "rb") as f:
            texts.append(np.frombuffer(f.read(), dtype=np.uint8))
    return texts


def windows(texts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping windows: inputs are SEQ bytes, targets the same shifted by one."""
    xs, ys = [], []
    for data in texts:
        n = (len(data) - 1) // SEQ
        xs.append(data[: n * SEQ].reshape(n, SEQ))
        ys.append(data[1 : n * SEQ + 1].reshape(n, SEQ))
    return np.concatenate(xs).astype(np.int32), np.concatenate(ys).astype(np.int32)


class Block(nnx.Module):
    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=heads, in_features=dim, decode=False, rngs=rngs
        )
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.up = nnx.Linear(dim, 4 * dim, rngs=rngs)
        self.down = nnx.Linear(4 * dim, dim, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)

    def __call__(self, x, mask):
        x = x + self.dropout(self.attn(self.norm1(x), mask=mask))
        return x + self.dropout(self.down(nnx.gelu(self.up(self.norm2(x)))))


class CharLM(nnxfit.TrainModule):
    def __init__(self, dim: int = 64, heads: int = 4, layers: int = 2, *, rngs: nnx.Rngs):
        self.tokens = nnx.Embed(VOCAB, dim, rngs=rngs)
        self.positions = nnx.Embed(SEQ, dim, rngs=rngs)
        self.blocks = nnx.List([Block(dim, heads, rngs=rngs) for _ in range(layers)])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.out = nnx.Linear(dim, VOCAB, rngs=rngs)

    def __call__(self, ids):  # ids: (batch, length <= SEQ) -> logits (batch, length, VOCAB)
        x = self.tokens(ids) + self.positions(jnp.arange(ids.shape[1]))
        mask = nnx.make_causal_mask(ids)  # position i attends to positions <= i only
        for block in self.blocks:
            x = block(x, mask)
        return self.out(self.norm(x))

    def loss(self, batch):
        x, y = batch
        return optax.softmax_cross_entropy_with_integer_labels(self(x), y).mean()

    def training_step(self, batch):
        return self.loss(batch)

    def validation_step(self, batch):
        return {"loss": self.loss(batch)}

    def configure_optimizers(self):
        total = self.trainer.estimated_stepping_batches
        lr = optax.warmup_cosine_decay_schedule(0.0, 4e-3, max(1, total // 20), total)
        return optax.adamw(lr, b2=0.98, weight_decay=0.01)


def generate(module: CharLM, prompt: bytes, n: int, temperature: float = 0.7, seed: int = 0):
    """Samples ``n`` bytes after ``prompt``, one at a time, from a fixed-size context window
    (so the jitted forward compiles once)."""
    graphdef, state = nnx.split(module)

    @jax.jit
    def next_logits(state, window, last):
        return nnx.merge(graphdef, state)(window)[0, last]

    out = list(prompt)
    key = jax.random.key(seed)
    for _ in range(n):
        ctx = out[-SEQ:]
        window = np.zeros((1, SEQ), np.int32)
        window[0, : len(ctx)] = ctx
        logits = next_logits(state, window, len(ctx) - 1)
        key, sub = jax.random.split(key)
        out.append(int(jax.random.categorical(sub, logits / temperature)))
    return bytes(out).decode("utf-8", errors="replace")


def main() -> float:
    texts = corpus()
    # The last 10 % of every file is held out, so validation sees the same kinds of code.
    cut = [int(0.9 * len(t)) for t in texts]
    train = windows([t[:c] for t, c in zip(texts, cut, strict=True)])
    val = windows([t[c:] for t, c in zip(texts, cut, strict=True)])
    module = CharLM(rngs=nnx.Rngs(0))
    trainer = nnxfit.Trainer(
        max_epochs=1 if FAST else 3,
        limit_train_batches=5 if FAST else None,
        limit_val_batches=2 if FAST else None,
        grad_clip_norm=1.0,
        steps_per_execution=8,  # 8 optimizer steps per jitted call: less Python per step
    )
    history = trainer.fit(
        module,
        ArrayLoader(train, batch_size=32, shuffle=True, seed=0, drop_last=True),
        val_data=ArrayLoader(val, batch_size=128),
    )
    ppl = float(np.exp(history.history["val_loss"][-1]))
    sample = generate(module, b"def ", 40 if FAST else 300)
    print("sample:\n" + sample)
    print(
        f"result: val_perplexity={ppl:.2f} (bytes of {len(FILES)} stdlib files, "
        f"{sum(map(len, texts))} bytes, {trainer.global_step} steps)"
    )
    return ppl


if __name__ == "__main__":
    main()
