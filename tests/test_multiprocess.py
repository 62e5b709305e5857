"""Two real processes over ``jax.distributed`` (CPU, gloo) equal one process on the same data.

Each process has 2 CPU devices and feeds its half of every global batch; together they form a
4-device mesh. The reference is a plain single-device fit in this process on the global
batches. tests/scripts/multiprocess_worker.py is the worker.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import nnxfit

SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")
sys.path.insert(0, SCRIPTS)
import multiprocess_worker as worker  # noqa: E402

RTOL = 2e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """(worker results, single-process reference); the reference runs while workers do."""
    out = tmp_path_factory.mktemp("mp")
    port = str(free_port())
    script = os.path.join(SCRIPTS, "multiprocess_worker.py")
    procs = [
        subprocess.Popen(
            [sys.executable, script, str(pid), port, str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in range(worker.N_PROCESSES)
    ]
    logs = []
    try:
        ref = reference_run()
        for p in procs:
            logs.append(p.communicate(timeout=180)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    results = []
    for pid in range(worker.N_PROCESSES):
        with open(out / f"result{pid}.json") as f:
            meta = json.load(f)
        results.append((meta, dict(np.load(out / f"result{pid}.npz"))))
    return results, ref


@pytest.fixture(scope="module")
def runs(both):
    return both[0]


@pytest.fixture(scope="module")
def reference(both):
    return both[1]


def reference_run():
    """The same fit on one device, fed the global batches."""
    module = worker.make_module()
    trainer = nnxfit.Trainer(max_epochs=2, progress_bar=False, log_every_n_steps=1)
    history = trainer.fit(module, worker.global_batches(), val_data=worker.val_batches(None))
    state = nnx.state(module, nnx.Any(nnx.Param, nnx.BatchStat))
    params = {
        f"param{jax.tree_util.keystr(p)}": np.asarray(v)
        for p, v in jax.tree_util.tree_flatten_with_path(state)[0]
    }
    val = trainer.validate(module, worker.val_batches(None))
    pred = trainer.predict(module, worker.val_batches(None))
    return history.history, params, val, pred


def assert_close(a, b, what):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    # Relative to each array's scale; the floor covers the bias in front of BatchNorm, whose
    # gradient is zero, so both runs move it by float noise only.
    scale = max(float(np.abs(b).max(initial=0.0)), 1e-3)
    assert np.abs(a - b).max(initial=0.0) <= RTOL * scale, (what, a, b)


def test_two_processes_form_one_mesh(runs):
    for pid, (meta, _) in enumerate(runs):
        assert (meta["process_count"], meta["devices"], meta["local_devices"]) == (2, 4, 2)
        assert meta["is_global_zero"] == (pid == 0)
        assert meta["trace_count"] == 1


def test_final_params_equal_single_process(runs, reference):
    _, ref_params, _, _ = reference
    for _, arrays in runs:
        names = {k for k in arrays if k.startswith("param")}
        assert names == set(ref_params)
        for k in names:
            assert_close(arrays[k], ref_params[k], k)


def test_logs_equal_single_process(runs, reference):
    ref_history, _, ref_val, _ = reference
    for meta, _ in runs:
        assert meta["history"].keys() == ref_history.keys()
        for k, values in ref_history.items():
            assert_close(meta["history"][k], values, k)
        for k, v in ref_val.items():
            assert_close(meta["validate"][k], v, k)


def test_predict_returns_this_process_rows(runs, reference):
    *_, ref_pred = reference
    sizes = worker.VAL_SIZES
    for pid, (_, arrays) in enumerate(runs):
        # Rows of process pid in each validation batch, in the global order.
        rows, start = [], 0
        for s in sizes:
            lo = start + sum(s[:pid])
            rows.extend(range(lo, lo + s[pid]))
            start += sum(s)
        assert arrays["predict"].shape == (len(rows), 3)
        assert_close(arrays["predict"], ref_pred[rows], "predict")


def test_output_only_on_process_zero(runs):
    (meta0, _), (meta1, _) = runs
    assert meta0["console_chars"] > 0 and meta0["csv"]
    assert meta1["console_chars"] == 0 and not meta1["csv"]
