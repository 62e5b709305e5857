"""``Trainer(mesh=...)`` on a 4-device CPU mesh equals one device.

The device count is fixed when jax starts, so the fits run in one subprocess
(tests/scripts/sharding_scenarios.py) that prints its numbers as JSON; the tests below check
them. Single-device references run in that same process with ``mesh=None``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "sharding_scenarios.py")
RTOL = 2e-5


@pytest.fixture(scope="module")
def results():
    proc = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULTS ") :])


def scenario(results, name) -> dict:
    r = results[name]
    assert "error" not in r, r.get("error")
    return r


def test_data_parallel_equals_one_device(results):
    r = scenario(results, "data_parallel")  # BatchNorm + dropout: global stats, same keys
    assert r["param_rel_diff"] < RTOL
    assert r["history_rel_diff"] < RTOL
    assert set(r["history"]) == {"loss", "accuracy", "val_loss", "val_accuracy"}


def test_batches_split_and_state_replicated(results):
    r = scenario(results, "data_parallel")
    assert r["batch_spec"] == "P('data',)" and r["batch_devices"] == 4
    assert r["state_on_mesh"] and r["state_specs"] == ["P()"]
    assert r["module_specs"] == ["P()"]  # the module holds the mesh arrays after fit


def test_step_compiles_once(results):
    r = scenario(results, "data_parallel")  # 3 epochs: the carry keeps its shardings
    assert r["trace_count"] == 1
    assert r["train_compiles"] == 1
    assert scenario(results, "fsdp")["trace_count"] == 1


def test_validation_and_predict_of_any_batch_size(results):
    r = scenario(results, "data_parallel")
    # validate() of batches of 30, 30, 6 on 4 devices: 28 sharded + 2 replicated each.
    assert r["validate_rel_diff"] < RTOL
    assert r["validate_repeat_equal"]
    # Three eval programs on the mesh (28, 2 and 4 examples) and two on one device (30, 6).
    assert r["eval_compiles"] == 5
    # predict() of batches of 10, 10, 10, 10, 3: none divides by 4.
    assert r["predict_shape"] == [43, 3]
    assert r["predict_rel_diff"] < RTOL


def test_steps_per_execution_and_grad_accum_on_mesh(results):
    r = scenario(results, "stacked")  # batch axis behind two stacking axes
    assert r["param_rel_diff"] < RTOL
    assert r["history_rel_diff"] < RTOL
    assert r["global_step"] == 6
    assert r["train_compiles"] == 2  # the K=2 scan and the single tail call


def test_fsdp_shards_params_and_optimizer_state(results):
    r = scenario(results, "fsdp")
    assert r["param_rel_diff"] < RTOL
    assert r["history_rel_diff"] < RTOL
    assert r["created_on_devices"] == 1  # placed by the Trainer, from the annotations
    want = {"l1": "P(None, 'data')", "l2": "P('data', None)", "l3": "P()"}
    assert r["kernel_specs"] == want
    assert r["mu_specs"] == want  # Adam's moments follow the params they mirror
    # The two big kernels (8x64, 64x32) hold a quarter per device; the rest is replicated.
    kernels = (8 * 64 + 64 * 32) * 4
    assert r["param_bytes_device0"] == r["param_bytes_total"] - kernels * 3 // 4
    assert r["opt_bytes_device0"] < r["opt_bytes_total"] / 3


def test_sharded_checkpoint_resumes_on_a_smaller_mesh(results):
    r = scenario(results, "checkpoint")
    if "skipped" in r:
        pytest.skip(r["skipped"])
    # Saved from 4 devices, restored straight onto the 2-device targets of the live state.
    assert r["restored_devices"] == [2]
    assert r["restored_specs"] == {"l1": "P(None, 'data')", "l2": "P('data', None)", "l3": "P()"}
    assert r["restored_mu_specs"] == {"l1": "P(None, 'data')", "l2": "P('data', None)"}
    assert r["epochs"] == [0, 1] and r["final_devices"] == 2
    assert r["param_rel_diff"] < RTOL  # ends where an uninterrupted 4-device run ends
    assert r["trace_count"] == 1


def test_mesh_errors_name_the_numbers(results):
    r = scenario(results, "errors")
    assert "batch of 6 examples" in r["train_batch_6"]
    assert "'data' axis of size 4" in r["train_batch_6"]
    assert "e.g. 4 or 8" in r["train_batch_6"]
    assert r["train_batch_6"].startswith("BatchError")
    assert "batch of 10 examples" in r["short_batch"] and "drop_last=True" in r["short_batch"]
    assert "batch of 10 examples" in r["stacked_short"]  # axis 1 behind the stacking axis
    assert r["no_data_axis"].startswith("ConfigError") and "('batch',)" in r["no_data_axis"]
    assert "['extra']" in r["unknown_axis"] and "'model'" in r["unknown_axis"]
