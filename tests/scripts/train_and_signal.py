"""A fit run in a child process by tests/test_faults.py, and the setup those tests share.

Usage: python train_and_signal.py MODE WORKDIR [OUT]

* ``signal``: trains with a ModelCheckpoint; after step ``MARK_STEP`` writes its pid to
  WORKDIR/marker and then slows to ``SLOW`` seconds per step until the test's SIGTERM or SIGINT
  arrives. The interrupted fit raises ``nnxfit.TrainingInterrupted``, uncaught: the exit a
  user's script would see.
* ``twice``: ``signal`` with the 64 MiB module of ``killsave`` and ``every_n_steps=4``, so that
  the save on interruption lasts long enough for the test's second SIGINT to land during it.
* ``atend``: sends itself SIGTERM from ``on_fit_end``, before ModelCheckpoint's final save.
* ``hold``: ``signal`` without a checkpoint and 10x slower, for a test that needs a fit holding
  WORKDIR while it tries another.
* ``killsave``: a module with a 64 MiB buffer and ``ModelCheckpoint(every_n_steps=4)``; right
  after the save of step 8 has started writing (its tmp folder exists), SIGKILLs itself.
* ``resume``: ``fit(..., resume=True)``, writes the final train state to OUT (.npz) and the
  History to OUT.json (``big=1`` as 4th argument: the 64 MiB module of ``killsave``).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # tests/models.py
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from models import Classifier, toy_data  # noqa: E402

import nnxfit  # noqa: E402
from nnxfit.callbacks.checkpoint import ModelCheckpoint  # noqa: E402
from nnxfit.data import ArrayLoader  # noqa: E402

MARK_STEP = 9  # epoch 1, batch 2: 7 batches per epoch (100 rows, batch 16, short last of 4)
SLOW = 0.1
KILL_STEP = 8
PAD_SIZE = 16 * 2**20  # float32: 64 MiB
FIT = dict(max_epochs=4, progress_bar=False, log_every_n_steps=3)


class Padded(Classifier):
    """The test classifier plus a 64 MiB non-trainable buffer, so that a save takes long
    enough to be killed in the middle (random values: zeros would compress to nothing)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        pad = np.random.default_rng(0).standard_normal(PAD_SIZE, dtype=np.float32)
        self.pad = nnx.Variable(jnp.asarray(pad))


def make_module(seed: int = 0, big: bool = False):
    cls = Padded if big else Classifier
    return cls(seed=seed, dropout=0.5, batchnorm=True)


def train_data():
    x, y = toy_data(100, seed=3)
    return ArrayLoader((x, y), batch_size=16, shuffle=True, seed=1)


def val_data():
    x, y = toy_data(40, seed=4)
    return ArrayLoader((x, y), batch_size=16)


def state_arrays(trainer) -> list[np.ndarray]:
    """Every array of the fit's state (params, BatchStat, RNG key data and counts, optimizer
    state, counters) as host copies, in a fixed order."""
    out = []
    for x in jax.tree.leaves(trainer.train_state()):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        out.append(np.array(x, copy=True))
    return out


class Marker(nnxfit.Callback):
    def __init__(self, path, slow=SLOW):
        self.path, self.slow = path, slow

    def on_train_batch_end(self, trainer, module, step, logs):
        if step >= MARK_STEP:
            if not os.path.exists(self.path):
                with open(self.path + ".tmp", "w") as f:
                    f.write(str(os.getpid()))
                os.replace(self.path + ".tmp", self.path)  # never seen half-written
            time.sleep(self.slow)


class TermAtFitEnd(nnxfit.Callback):
    order = 10  # before ModelCheckpoint (50) writes the final checkpoint

    def on_fit_end(self, trainer, module):
        os.kill(os.getpid(), signal.SIGTERM)


class KillDuringSave(nnxfit.Callback):
    order = 60  # after ModelCheckpoint (50) has started the save of this step

    def __init__(self, directory):
        self.directory = directory

    def on_train_batch_end(self, trainer, module, step, logs):
        if step != KILL_STEP:
            return
        tmp = os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp")
        done = os.path.join(self.directory, str(step))
        deadline = time.monotonic() + 20
        while not os.path.exists(tmp) and not os.path.exists(done):
            if time.monotonic() > deadline:
                sys.exit(4)
            time.sleep(0.001)
        if os.path.exists(done):
            sys.exit(3)  # the save finished first: the test cannot prove anything
        os.kill(os.getpid(), signal.SIGKILL)


def main(argv):
    mode, workdir = argv[1], argv[2]
    if mode in ("signal", "twice", "hold"):
        big = mode == "twice"
        ckpt = {"signal": [ModelCheckpoint()], "twice": [ModelCheckpoint(every_n_steps=4)]}
        trainer = nnxfit.Trainer(
            workdir=workdir,
            callbacks=[
                *ckpt.get(mode, []),
                Marker(os.path.join(workdir, "marker"), slow=10 * SLOW if mode == "hold" else SLOW),
            ],
            **FIT,
        )
        trainer.fit(make_module(big=big), train_data(), val_data())
        sys.exit(5)  # finished without being interrupted
    if mode == "atend":
        trainer = nnxfit.Trainer(
            workdir=workdir, callbacks=[ModelCheckpoint(), TermAtFitEnd()], **FIT
        )
        trainer.fit(make_module(), train_data(), val_data())
        sys.exit(5)  # the fit returned: the SIGTERM was swallowed
    if mode == "killsave":
        trainer = nnxfit.Trainer(
            workdir=workdir,
            callbacks=[
                ModelCheckpoint(every_n_steps=4),
                KillDuringSave(os.path.join(workdir, "checkpoints")),
            ],
            **FIT,
        )
        trainer.fit(make_module(big=True), train_data(), val_data())
        sys.exit(5)
    if mode == "resume":
        out = argv[3]
        big = len(argv) > 4 and argv[4] == "big=1"
        every = dict(every_n_steps=4) if big else {}
        trainer = nnxfit.Trainer(workdir=workdir, callbacks=[ModelCheckpoint(**every)], **FIT)
        history = trainer.fit(make_module(seed=7, big=big), train_data(), val_data(), resume=True)
        np.savez(out, *state_arrays(trainer))
        with open(out + ".json", "w") as f:
            json.dump(
                {
                    "history": history.history,
                    "epoch": history.epoch,
                    "resumed_from": trainer.resumed_from,
                },
                f,
            )
        return
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv)
