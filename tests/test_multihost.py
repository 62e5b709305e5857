"""Checkpoints, resume, signals and data across real processes (``jax.distributed`` on
localhost: a local coordinator, 2 CPU devices per process, gloo collectives).

tests/scripts/multihost_worker.py is each process; every global batch comes from
``ArrayLoader(..., shard_by_process=True)``. One launch of 2 processes does several fits
(a process start and gloo setup cost seconds on 2 cores), each test reads what it needs.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from models import Classifier

import nnxfit

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "multihost_worker.py")
FULL_STEPS, PART_STEPS = 8, 3
# One process resuming the 2-process checkpoint runs the same global batches on another
# device layout: the sums of the all-reduce happen in another order, so the numbers agree to
# float rounding only (measured: < 2e-7 relative to each array's scale).
RTOL = 2e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(scenario: str, out, n: int = 2, timeout: float = 150, env=None) -> list:
    """Runs ``scenario`` on ``n`` processes; returns [(returncode, output, seconds)]."""
    port = str(free_port())
    environ = {**os.environ, **(env or {})}
    t0 = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, SCRIPT, scenario, str(i), str(n), port, str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=environ,
        )
        for i in range(n)
    ]
    results = []
    try:
        for p in procs:
            log = p.communicate(timeout=max(1.0, timeout - (time.monotonic() - t0)))[0]
            results.append((p.returncode, log, time.monotonic() - t0))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return results


def ok(results) -> None:
    for i, (rc, log, _) in enumerate(results):
        assert rc == 0, f"process {i} exited {rc}:\n{log[-4000:]}"


def params(out, name: str, pid: int = 0) -> dict:
    return dict(np.load(os.path.join(out, f"{name}-p{pid}.npz")))


def meta(out, name: str, pid: int = 0) -> dict:
    with open(os.path.join(out, f"{name}-p{pid}.json")) as f:
        return json.load(f)


def steps(path) -> list[int]:
    return sorted(int(n) for n in os.listdir(path) if n.isdigit())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The ``sigterm`` scenario, then ``save`` (which also resumes the interrupted fit)."""
    out = tmp_path_factory.mktemp("multihost")
    results = launch("sigterm", out)
    written = steps(out / "dp-term" / "checkpoints")  # before the resume adds its own
    (out / "sigterm.json").write_text(json.dumps({"results": results, "steps": written}))
    ok(launch("save", out))
    return out


def test_two_processes_write_one_checkpoint(saved):
    for kind in ("dp", "fsdp"):
        full = saved / f"{kind}-full"
        # Every third step, and the end of the fit (every_n_steps=3, save_top_k=-1).
        assert steps(full / "steps") == [3, 6, FULL_STEPS]
        # The best by val_loss and the last, from the same metrics on both processes.
        val = meta(saved, f"save-{kind}-full")["history"]["val_loss"]
        best = (int(np.argmin(val)) + 1) * 4
        assert steps(full / "checkpoints") == sorted({best, FULL_STEPS})
        # One checkpoint both processes wrote into: each process its shards, process 0 the
        # metadata and the checksum manifest, which covers both processes' files.
        step = full / "steps" / "3"
        with open(step / "nnxfit_manifest.json") as f:
            files = json.load(f)["items"]
        if kind == "fsdp":  # sharded kernels: process 1 wrote its halves (and Adam's)
            for item in ("module", "train"):
                assert os.path.isdir(step / item / "ocdbt.process_1"), os.listdir(step / item)
                assert any(n.startswith("ocdbt.process_1/") for n in files[item])
        assert not glob.glob(str(full / "**" / "*orbax-checkpoint-tmp*"), recursive=True)


def test_only_process_zero_writes_logs(saved):
    full = saved / "dp-full"
    assert len(glob.glob(str(full / "tensorboard" / "events.out.tfevents.*"))) == 1
    with open(full / "metrics.csv") as f:
        rows = [line.split(",")[:3] for line in f.read().splitlines()[1:]]
    assert len(rows) == len({tuple(r) for r in rows}) == FULL_STEPS + 2  # steps + 2 epochs


@pytest.mark.parametrize("kind", ["dp", "fsdp"])
def test_resume_on_two_processes_is_bit_exact(saved, kind):
    full = params(saved, f"save-{kind}-full")
    for pid in (0, 1):
        resumed = params(saved, f"save-{kind}-resumed", pid)
        assert resumed.keys() == full.keys()
        for k in full:
            np.testing.assert_array_equal(resumed[k], full[k], err_msg=f"{k} on process {pid}")
    assert (
        meta(saved, f"save-{kind}-resumed")["history"]
        == meta(saved, f"save-{kind}-full")["history"]
    )


def test_unequal_batch_counts_name_the_process(saved):
    for pid in (0, 1):
        # Loaders with a len: before training.
        error = meta(saved, "save-count-error", pid)["error"]
        assert error is not None
        assert "process 0: 8, process 1: 7" in error and "process 1 differs" in error
        # Without one: at the end of the first epoch.
        error = meta(saved, "save-epoch-count-error", pid)["error"]
        assert error is not None
        assert "in epoch 0 (process 0: 8, process 1: 7)" in error, error


def test_resume_on_one_process(saved):
    """The 2-process checkpoint of step 3 continues on 1 process with 4 devices and on 1
    device: same batches (loader positions count global batches), same numbers to float
    rounding."""
    ok(launch("resume_here", saved, n=1))
    for kind in ("dp", "fsdp"):
        full = params(saved, f"save-{kind}-full")
        full_history = meta(saved, f"save-{kind}-full")["history"]
        for where in ("4dev", "1dev"):
            got = params(saved, f"resume_here-{kind}-{where}")
            for k in full:
                # The bias in front of BatchNorm moves by float noise only: a floor of 1e-3.
                scale = max(float(np.abs(full[k]).max()), 1e-3)
                diff = float(np.abs(got[k] - full[k]).max())
                assert diff <= RTOL * scale, (kind, where, k, diff, scale)
            history = meta(saved, f"resume_here-{kind}-{where}")["history"]
            for k, values in full_history.items():
                np.testing.assert_allclose(history[k], values, rtol=RTOL, err_msg=k)


def test_sigterm_to_one_process_stops_all_at_one_step(saved):
    """SIGTERM reaches process 1 only (from its hook of step 2; process 0 may have sent more
    calls by then): both stop after the same step, write one checkpoint of it, exit by the
    signal, and a resume on 2 processes ends bit for bit where the uninterrupted fit ends."""
    sigterm = json.loads((saved / "sigterm.json").read_text())
    results = sigterm["results"]
    stopped = set()
    for pid, (rc, log, _) in enumerate(results):
        # Ended by SIGTERM (a shell reports 143), as a process the signal reached would.
        assert rc == -signal.SIGTERM, f"process {pid} exited {rc}:\n{log[-4000:]}"
        line = next(x for x in log.splitlines() if x.startswith("nnxfit.errors.Training"))
        stopped.add(line.split("stopped after step ")[1].split()[0])
    assert len(stopped) == 1, stopped  # the same step on both
    (step,) = stopped
    assert sigterm["steps"] == [int(step)]  # one checkpoint, of that step
    assert "[process 0]: SIGTERM reached process 1" in results[0][1]
    assert "[process 1]: SIGTERM received" in results[1][1]
    full = params(saved, "save-dp-full")
    for pid in (0, 1):
        resumed = params(saved, "save-dp-term-resumed", pid)
        for k in full:
            np.testing.assert_array_equal(resumed[k], full[k], err_msg=f"{k} on process {pid}")
    resumed_history = meta(saved, "save-dp-term-resumed")["history"]
    assert resumed_history == meta(saved, "save-dp-full")["history"]


def test_sigkill_of_one_process(saved):
    """Process 1 is killed (SIGKILL) at step 5, its checkpoint of step 4 complete: process 0
    does not wait forever in the collective it shared with it. It fails, names process 1 and
    the intact checkpoint, and exits non-zero (jax.distributed then ends it once the
    heartbeat timeout, 10 s here, confirms the loss). The checkpoint of step 4 loads, its
    checksums verified."""
    env = {"NNXFIT_HEARTBEAT_S": "10"}
    (rc0, log0, _), (rc1, _, _) = launch("sigkill", saved, timeout=120, env=env)
    assert rc1 == -signal.SIGKILL
    assert rc0 != 0
    assert "nnxfit [process 0]: process 1 of 2 is gone" in log0, log0[-4000:]
    ckpts = saved / "dp-kill" / "checkpoints"
    assert f"last complete checkpoint is intact: {ckpts / '4'}" in log0
    assert 4 in steps(ckpts)
    module = Classifier(dropout=0.2, batchnorm=True, opt="sgd", lr=0.1)
    info = nnxfit.load_checkpoint(module, ckpts / "4")
    assert info.step == 4
