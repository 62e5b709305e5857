"""One of two processes of a data-parallel fit over ``jax.distributed`` on CPU.

Usage: python multiprocess_worker.py PROCESS_ID PORT OUT_DIR   (run by tests/test_multiprocess.py)

2 processes x 2 local CPU devices make one 4-device mesh. Every process feeds its own half of
each global batch (``global_batches`` below is the single source of truth for the test's
single-process reference) and writes what it ended with to OUT_DIR/result{PROCESS_ID}.npz.
"""

from __future__ import annotations

import io
import json
import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
).strip()
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # tests/models.py

import jax  # noqa: E402
import numpy as np  # noqa: E402
from models import Classifier, toy_data  # noqa: E402

N_PROCESSES = 2
GLOBAL_BATCH = 16
VAL_SIZES = ((7, 5), (5, 3))  # per validation batch: examples on process 0, on process 1


def make_module():
    return Classifier(dropout=0.2, batchnorm=True, opt="sgd", lr=0.1)


def global_batches():
    x, y = toy_data(64, seed=1)
    return [(x[i : i + GLOBAL_BATCH], y[i : i + GLOBAL_BATCH]) for i in range(0, 64, GLOBAL_BATCH)]


def local_batches(pid: int):
    """This process's contiguous part of each global batch."""
    per = GLOBAL_BATCH // N_PROCESSES
    return [
        (x[pid * per : (pid + 1) * per], y[pid * per : (pid + 1) * per])
        for x, y in global_batches()
    ]


def val_batches(pid: int | None):
    """Validation batches whose sizes differ between processes; ``None``: the global ones."""
    x, y = toy_data(20, seed=2)
    out, start = [], 0
    for sizes in VAL_SIZES:
        lo = start + sum(sizes[:pid]) if pid is not None else start
        hi = lo + (sizes[pid] if pid is not None else sum(sizes))
        out.append((x[lo:hi], y[lo:hi]))
        start += sum(sizes)
    return out


def main(pid: int, port: int, out_dir: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}", num_processes=N_PROCESSES, process_id=pid
    )
    from flax import nnx
    from rich.console import Console

    import nnxfit

    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    buf = io.StringIO()
    trainer = nnxfit.Trainer(
        max_epochs=2,
        mesh=mesh,
        workdir=os.path.join(out_dir, f"workdir{pid}"),
        log_every_n_steps=1,
        console=Console(file=buf, force_terminal=True, width=100),
    )
    module = make_module()
    history = trainer.fit(module, local_batches(pid), val_data=val_batches(pid))
    params = nnx.state(module, nnx.Any(nnx.Param, nnx.BatchStat))
    flat = {
        jax.tree_util.keystr(p): np.asarray(v)
        for p, v in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    val = trainer.validate(module, val_batches(pid))
    pred = trainer.predict(module, val_batches(pid))
    np.savez(
        os.path.join(out_dir, f"result{pid}.npz"),
        predict=pred,
        **{f"param{k}": v for k, v in flat.items()},
    )
    with open(os.path.join(out_dir, f"result{pid}.json"), "w") as f:
        json.dump(
            {
                "process_count": jax.process_count(),
                "devices": jax.device_count(),
                "local_devices": jax.local_device_count(),
                "is_global_zero": trainer.is_global_zero,
                "history": history.history,
                "validate": val,
                "console_chars": len(buf.getvalue()),
                "csv": os.path.exists(os.path.join(out_dir, f"workdir{pid}", "metrics.csv")),
                "trace_count": trainer.programs.trace_count,
            },
            f,
        )
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
