"""EMA on a 4-device CPU mesh (FSDP kernels): the average is sharded like its parameter,
the step compiles once, and the average equals one device's. Prints one JSON line (run by
tests/test_ema.py; the device count must be fixed before jax starts)."""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
sys.path[:0] = [os.path.dirname(__file__), os.path.join(os.path.dirname(__file__), "..")]

import jax  # noqa: E402
from flax import nnx  # noqa: E402
from models import toy_data  # noqa: E402
from sharding_scenarios import AUTO_MESH, FSDPNet, rel_diff  # noqa: E402

import nnxfit  # noqa: E402
from nnxfit.callbacks import EMA  # noqa: E402
from nnxfit.data import ArrayLoader  # noqa: E402


def run(mesh):
    data = ArrayLoader(toy_data(64), 16, shuffle=True)
    ema = EMA(0.9, apply_at_end=False)
    with nnx.use_eager_sharding(False):
        module = FSDPNet(annotate=mesh is not None)
    trainer = nnxfit.Trainer(max_epochs=2, mesh=mesh, progress_bar=False, callbacks=[ema])
    trainer.fit(module, data, val_data=data)
    return trainer, ema.average(trainer)


one, one_avg = run(None)
four, four_avg = run(AUTO_MESH)
params = four.train_state()["params"]
print(
    "RESULTS "
    + json.dumps(
        {
            "param_specs": [str(x.sharding.spec) for x in jax.tree.leaves(params)],
            "ema_specs": [str(x.sharding.spec) for x in jax.tree.leaves(four_avg)],
            "trace_count": four.programs.trace_count,
            "ema_rel_diff": rel_diff(four_avg, one_avg),
        }
    )
)
