"""Every example runs end to end in its fast mode (NNXFIT_FAST=1) and prints its result line.

``make test`` runs the examples whose paths nothing else covers end to end (the demo, the
export read back without nnxfit, frozen layers, callbacks, data parallel, lr_find, the GAN's
manual optimization);
``make examples`` (``NNXFIT_ALL_EXAMPLES=1``) adds the slow ones (char_lm, vae, fsdp), whose
features the unit tests cover, to keep ``make test`` well under 15 minutes on 2 cores.

The examples start together as subprocesses (one module-level fixture), so the file costs
about the slowest example plus the CPU the others need, not the sum of their times.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# One xdist worker runs this whole file (``make test`` passes ``--dist loadgroup``): the
# fixture is per worker, so split over two it would start every example twice.
pytestmark = pytest.mark.xdist_group("examples")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NAMES = [
    "digits_cnn",
    "char_lm",
    "vae",
    "finetune_frozen",
    "custom_callback",
    "data_parallel",
    "fsdp",
    "digits_f1_export",
    "lr_find",
    "gan",
]
SLOW = {"char_lm", "vae", "fsdp"}
ALL = os.environ.get("NNXFIT_ALL_EXAMPLES") == "1"
if not ALL:
    NAMES = [n for n in NAMES if n not in SLOW]
slow = pytest.mark.skipif(not ALL, reason="slow example: make examples runs it")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Starts every example at once; ``runs[name]()`` waits for one and returns
    ``(returncode, output, workdir)``."""
    env = dict(os.environ, NNXFIT_FAST="1", PYTHONUNBUFFERED="1")
    env.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
    procs = {}
    for name in NAMES:
        cwd = tmp_path_factory.mktemp(name)
        p = subprocess.Popen(
            [sys.executable, str(EXAMPLES / f"{name}.py")],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        procs[name] = (p, cwd)
    done = {}

    def wait(name):
        if name not in done:
            p, cwd = procs[name]
            out, _ = p.communicate(timeout=300)
            done[name] = (p.returncode, out, cwd)
        return done[name]

    yield wait
    for p, _ in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait()


def result_line(out: str) -> str:
    lines = [ln for ln in out.splitlines() if ln.startswith("result: ")]
    assert lines, f"no 'result:' line in the output:\n{out[-3000:]}"
    return lines[-1]


def check(runs, name) -> tuple[str, str, Path]:
    code, out, cwd = runs(name)
    assert code == 0, f"examples/{name}.py exited with {code}:\n{out[-3000:]}"
    return result_line(out), out, cwd


def test_digits_cnn(runs):
    line, _, cwd = check(runs, "digits_cnn")
    acc = float(re.search(r"val_accuracy=([0-9.]+)", line).group(1))
    assert 0.0 <= acc <= 1.0
    assert "restored from" in line and (cwd / "runs/digits/checkpoints").is_dir()
    assert (cwd / "runs/digits/metrics.csv").is_file()
    assert list((cwd / "runs/digits/plots").glob("*.png"))


@slow
def test_char_lm(runs):
    line, out, _ = check(runs, "char_lm")
    ppl = float(re.search(r"val_perplexity=([0-9.]+)", line).group(1))
    assert 1.0 < ppl < 256.0  # below uniform over bytes after even a few steps
    assert "sample:\ndef " in out


@slow
def test_vae(runs):
    line, _, cwd = check(runs, "vae")
    assert "wrote runs/vae/reconstructions.png" in line
    png = cwd / "runs/vae/reconstructions.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_finetune_frozen(runs):
    line, _, _ = check(runs, "finetune_frozen")
    assert line.endswith("backbone bitwise unchanged: True")


def test_custom_callback(runs):
    line, out, _ = check(runs, "custom_callback")
    assert "interrupted: SIGTERM" in out
    assert "callback state survived the resume: True" in line


def test_data_parallel(runs):
    line, _, _ = check(runs, "data_parallel")
    acc = float(re.search(r"val_accuracy=([0-9.]+)", line).group(1))
    assert 0.0 <= acc <= 1.0


@slow
def test_fsdp(runs):
    line, _, _ = check(runs, "fsdp")
    assert "per device of" in line


def test_digits_f1_export(runs):
    line, out, cwd = check(runs, "digits_f1_export")
    f1 = float(re.search(r"test_f1=([0-9.]+)", line).group(1))
    assert 0.0 <= f1 <= 1.0 and "test confusion matrix" in out
    assert line.endswith("fresh-process predictions equal: True")
    assert (cwd / "runs/digits_f1/weights").is_dir()


def test_lr_find(runs):
    line, out, cwd = check(runs, "lr_find")
    lr = float(re.search(r"suggested lr=([0-9.e+-]+)", line).group(1))
    assert 1e-7 <= lr <= 10.0
    assert line.endswith("module untouched: True")
    png = cwd / "runs/lr_find/lr_find.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gan(runs):
    line, _, cwd = check(runs, "gan")
    assert re.search(r"loss_d=[0-9.]+ loss_g=[0-9.]+ after 8 steps", line)
    pngs = sorted((cwd / "runs/gan").glob("samples_epoch_*.png"))
    assert [p.name for p in pngs] == ["samples_epoch_001.png", "samples_epoch_002.png"]
    assert pngs[-1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
