"""One process of a multi-process fit scenario (run by tests/test_multihost.py).

Usage: python multihost_worker.py SCENARIO PROCESS_ID NUM_PROCESSES PORT OUT_DIR

With NUM_PROCESSES > 1 the process joins ``jax.distributed`` (a local coordinator, gloo
collectives) with 2 CPU devices; with 1 it runs alone on 4 CPU devices. Every process feeds
its part of each global batch through ``ArrayLoader(..., shard_by_process=True)``, so the
data order is the same on any number of processes. Results go to
OUT_DIR/<scenario>-<name>-p<PROCESS_ID>.npz / .json.
"""

from __future__ import annotations

import json
import os
import signal
import sys

SCENARIO, PID, NPROC, PORT, OUT = sys.argv[1:6]
PID, NPROC = int(PID), int(NPROC)
DEVICES = 2 if NPROC > 1 else 4
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + f" --xla_force_host_platform_device_count={DEVICES}"
    # Bit for bit across runs: one thread per op (jax-ml/jax#39741).
    + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
).strip()
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # tests/models.py

import jax  # noqa: E402

if NPROC > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"localhost:{PORT}",
        num_processes=NPROC,
        process_id=PID,
        heartbeat_timeout_seconds=int(os.environ.get("NNXFIT_HEARTBEAT_S", "100")),
    )

import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from models import Classifier, toy_data  # noqa: E402

import nnxfit  # noqa: E402
from nnxfit.callbacks import ModelCheckpoint, TensorBoardLogger  # noqa: E402
from nnxfit.data import ArrayLoader  # noqa: E402

GLOBAL_BATCH = 16
FULL_STEPS, PART_STEPS = 8, 3  # 4 batches an epoch: the part stops inside epoch 0


class FSDPNet(nnxfit.TrainModule):
    """Kernels sharded over the 'data' axis (FSDP), across both processes."""

    def __init__(self):
        rngs = nnx.Rngs(0)
        init = nnx.initializers.lecun_normal()
        with nnx.use_eager_sharding(False):
            self.l1 = nnx.Linear(
                8, 16, kernel_init=nnx.with_partitioning(init, (None, "data")), rngs=rngs
            )
            self.l2 = nnx.Linear(
                16, 3, kernel_init=nnx.with_partitioning(init, ("data", None)), rngs=rngs
            )

    def training_step(self, batch):
        x, y = batch
        logits = self.l2(nnx.relu(self.l1(x)))
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def validation_step(self, batch):
        x, y = batch
        logits = self.l2(nnx.relu(self.l1(x)))
        return {"loss": optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()}

    def configure_optimizers(self):
        return optax.adamw(1e-2)


def make(kind: str):
    if kind.startswith("fsdp"):
        return FSDPNet()
    # SGD: the bias in front of BatchNorm gets a zero gradient and moves by float noise
    # only (Adam would scale that noise up to steps of the learning rate).
    return Classifier(dropout=0.2, batchnorm=True, opt="sgd", lr=0.1)


def mesh(kind: str):
    if kind.endswith("-1dev"):
        return None
    types = (jax.sharding.AxisType.Auto,) if kind.startswith("fsdp") else None
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=types)


def train_data():
    x, y = toy_data(64, seed=1)
    return ArrayLoader((x, y), GLOBAL_BATCH, shuffle=True, seed=3, shard_by_process=True)


def val_data():
    x, y = toy_data(20, seed=2)
    return ArrayLoader((x, y), 8, shard_by_process=True)


def floats(module) -> dict:
    from jax.experimental import multihost_utils

    state = nnx.state(module, nnx.Any(nnx.Param, nnx.BatchStat))
    out = {}
    for p, v in jax.tree_util.tree_flatten_with_path(state)[0]:
        if not v.is_fully_addressable:  # FSDP: each process holds part of the kernel
            v = multihost_utils.process_allgather(v, tiled=True)
        out[jax.tree_util.keystr(p)] = np.asarray(v)
    return out


def record(name: str, module, **meta) -> None:
    base = os.path.join(OUT, f"{SCENARIO}-{name}-p{PID}")
    np.savez(base + ".npz", **floats(module))
    with open(base + ".json", "w") as f:
        json.dump(meta, f)


def fit(kind: str, workdir: str, max_steps: int, resume=False, callbacks=()) -> tuple:
    trainer = nnxfit.Trainer(
        max_steps=max_steps,
        mesh=mesh(kind),
        workdir=os.path.join(OUT, workdir),
        log_every_n_steps=1,
        progress_bar=False,
        callbacks=list(callbacks),
    )
    module = make(kind)
    history = trainer.fit(module, train_data(), val_data=val_data(), resume=resume)
    return module, history.history


# ------------------------------------------------------------------------------ scenarios ---
def save() -> None:
    """2 processes: a full fit that keeps the best checkpoint by val_loss (and the last) and,
    in ``steps/``, every third step's; then a fit resumed from step 3 of it (data parallel
    and FSDP); the ``sigterm`` scenario's fit resumed; the batch-count check."""
    for kind in ("dp", "fsdp"):
        cbs = [
            ModelCheckpoint(monitor="val_loss", save_top_k=1),
            ModelCheckpoint(dirname="steps", every_n_steps=3, save_top_k=-1),
        ]
        if kind == "dp":
            cbs.append(TensorBoardLogger())
        m, h = fit(kind, f"{kind}-full", FULL_STEPS, callbacks=cbs)
        record(f"{kind}-full", m, history=h)
        step3 = os.path.join(OUT, f"{kind}-full", "steps", str(PART_STEPS))
        m, h = fit(kind, f"{kind}-resumed", FULL_STEPS, resume=step3, callbacks=[ModelCheckpoint()])
        record(f"{kind}-resumed", m, history=h)
    # The fit the ``sigterm`` scenario stopped (when it ran before), continued.
    if os.path.isdir(os.path.join(OUT, "dp-term")):
        m, h = fit("dp", "dp-term", FULL_STEPS, resume=True, callbacks=[ModelCheckpoint()])
        record("dp-term-resumed", m, history=h)
    # Process 1 has a batch fewer: an error before anything runs, on every process.
    x, y = toy_data(64 - 8 * PID, seed=1)
    try:
        nnxfit.Trainer(max_steps=2, mesh=mesh("dp"), progress_bar=False).fit(
            make("dp"), ArrayLoader((x, y), 8)
        )
        error = None
    except nnxfit.errors.BatchError as e:
        error = str(e)
    with open(os.path.join(OUT, f"{SCENARIO}-count-error-p{PID}.json"), "w") as f:
        json.dump({"error": error}, f)
    # The same with loaders that have no len: found at the end of the first epoch. Last:
    # process 1's extra call is left waiting in a collective process 0 never joins.
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, len(x), 8)]
    try:
        nnxfit.Trainer(max_epochs=2, mesh=mesh("dp"), progress_bar=False).fit(
            make("dp"), lambda: iter(batches)
        )
        error = None
    except nnxfit.errors.BatchError as e:
        error = str(e)
    with open(os.path.join(OUT, f"{SCENARIO}-epoch-count-error-p{PID}.json"), "w") as f:
        json.dump({"error": error}, f)


def resume_here() -> None:
    """One process: resumes the 2-process checkpoint of step PART_STEPS to FULL_STEPS, on a
    mesh of its 4 devices and on one device."""
    for kind in ("dp", "fsdp"):
        step3 = os.path.join(OUT, f"{kind}-full", "steps", str(PART_STEPS))
        for where in ("4dev", "1dev"):
            m, h = fit(f"{kind}-{where}", f"{kind}-{where}", FULL_STEPS, resume=step3)
            record(f"{kind}-{where}", m, history=h)


def sigterm() -> None:
    """2 processes: SIGTERM reaches process 1 only, at step 2 (from its own hook)."""

    class TermAt(nnxfit.Callback):
        def on_train_batch_end(self, trainer, module, step, logs):
            if step == 2 and PID == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    cbs = [ModelCheckpoint(every_n_steps=3), TermAt()]
    fit("dp", "dp-term", FULL_STEPS, callbacks=cbs)


def sigkill() -> None:
    """2 processes: process 1 is killed (SIGKILL) at step 5; step 4's checkpoint is complete."""

    class KillAt(nnxfit.Callback):
        def on_train_batch_end(self, trainer, module, step, logs):
            if step == 5 and PID == 1:
                trainer.callbacks[0]._writer.wait()  # step 4's save is complete
                os.kill(os.getpid(), signal.SIGKILL)

    fit("dp", "dp-kill", 10_000, callbacks=[ModelCheckpoint(every_n_steps=4), KillAt()])


SCENARIOS = {f.__name__: f for f in (save, resume_here, sigterm, sigkill)}

if __name__ == "__main__":
    SCENARIOS[SCENARIO]()
    if NPROC > 1:
        jax.distributed.shutdown()
