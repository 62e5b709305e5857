"""Several optimizers (automatic) and manual optimization on a 4-device CPU mesh: each fit
equals one device's and compiles once. Prints one JSON line (run by tests/test_optimizers.py;
the device count must be fixed before jax starts)."""

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
from sharding_scenarios import AUTO_MESH, rel_diff  # noqa: E402
from test_optimizers import DATA, TwoLosses, TwoPlayer  # noqa: E402

import nnxfit  # noqa: E402


def run(cls, mesh, spe):
    module = cls()
    trainer = nnxfit.Trainer(
        max_steps=len(DATA), mesh=mesh, progress_bar=False, steps_per_execution=spe
    )
    trainer.fit(module, DATA)
    return trainer, nnx.state(module, nnx.Param)


out = {}
for cls, spe in ((TwoLosses, 1), (TwoPlayer, 2)):
    _, one = run(cls, None, spe)
    four, got = run(cls, AUTO_MESH, spe)
    opt = four.train_state()["opt"]
    out[cls.__name__] = {
        "rel_diff": rel_diff(got, one),
        "trace_count": four.programs.trace_count,
        "devices": min(len(x.sharding.device_set) for x in jax.tree.leaves(opt)),
    }
print("RESULTS " + json.dumps(out))
