"""``nnxfit plot``: PNGs drawn from a real run's metrics.csv; the CLI as a real subprocess."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from matplotlib.image import imread
from models import Classifier, toy_data

import nnxfit
from nnxfit import cli
from nnxfit.data import ArrayLoader
from nnxfit.plot import PlotError, find_runs, plot_compare, plot_run, read_families

X, Y = toy_data(96)
ORANGE = np.array([1.0, 0.498, 0.055])  # matplotlib "C1": validation curves
BLUE = np.array([0.122, 0.467, 0.706])  # "C0": train curves


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    nnxfit.Trainer(max_epochs=3, workdir=workdir, progress_bar=False, log_every_n_steps=2).fit(
        Classifier(), ArrayLoader((X, Y), 16), val_data=ArrayLoader((X, Y), 32)
    )
    return workdir


def pixels_near(img, color, tol=0.08):
    return int((np.abs(img[..., :3] - color).max(-1) < tol).sum())


def test_plot_run_draws_train_and_val_on_the_same_axes(run_dir):
    paths = plot_run(run_dir)
    plots = run_dir / "plots"
    assert paths == [plots / "loss.png", plots / "accuracy.png", plots / "overview.png"]
    for p in paths:
        assert p.stat().st_size > 10_000
        img = imread(p)
        assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 500
        assert img[..., :3].std() > 0.05  # not a blank canvas
        # Train (blue) and validation (orange) curves on every chart.
        assert pixels_near(img, BLUE) > 200 and pixels_near(img, ORANGE) > 200, p
    overview = imread(plots / "overview.png")
    assert overview.shape[1] > imread(plots / "loss.png").shape[1]  # two charts side by side


def test_families_group_val_and_submodule_metrics(tmp_path):
    (tmp_path / "metrics.csv").write_text(
        "step,epoch,kind,loss,grad_norm,grad_norm/enc,lr,val_loss,val grad\n"
        "2,0,train,1.0,3.0,1.0,0.1,,\n"
        "4,0,train,0.5,2.0,nan,0.1,,\n"
        "4,0,epoch,0.75,2.5,1.0,0.1,0.8,7\n"
    )
    fams = read_families(tmp_path / "metrics.csv")
    assert list(fams) == ["loss", "grad_norm", "lr", "val grad"]
    assert [(s.label, s.steps, s.values) for s in fams["loss"]] == [
        ("loss (train, per log interval)", [2, 4], [1.0, 0.5]),
        ("loss (train, epoch mean)", [4], [0.75]),
        ("val_loss", [4], [0.8]),
    ]
    # lr is the rate at the interval's or the epoch's last step, not a mean: labelled so.
    assert [(s.label, s.steps, s.values) for s in fams["lr"]] == [
        ("lr (at each log step)", [2, 4], [0.1, 0.1]),
        ("lr (at epoch end)", [4], [0.1]),
    ]
    grad = {s.label: s.steps for s in fams["grad_norm"]}
    assert grad["grad_norm/enc (train, per log interval)"] == [2]  # the nan point is left out
    paths = plot_run(tmp_path, out_dir=tmp_path / "out")
    assert [p.name for p in paths] == [
        "loss.png",
        "grad_norm.png",
        "lr.png",
        "val_grad.png",
        "overview.png",
    ]


def test_cli_subprocess_writes_the_pngs_and_prints_their_paths(run_dir, tmp_path):
    out = tmp_path / "pngs"
    r = subprocess.run(
        [sys.executable, "-m", "nnxfit", "plot", str(run_dir), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    printed = r.stdout.split()
    assert printed == [str(out / n) for n in ("loss.png", "accuracy.png", "overview.png")]
    assert all(os.path.getsize(p) > 10_000 for p in printed)


def test_console_script_missing_workdir_exits_2_naming_path_and_fix(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "nnxfit")  # [project.scripts]
    if not os.path.exists(script):
        pytest.skip(f"{script} not installed; run pip install -e . to create it")
    missing = tmp_path / "no-such-run"
    r = subprocess.run(
        [script, "plot", str(missing)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert r.stdout == ""
    assert str(missing) in r.stderr and "does not exist" in r.stderr
    assert "Trainer(workdir=...)" in r.stderr


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, r"no metrics.csv in .*Trainer\(workdir=\.\.\.\)"),
        ("", r"metrics.csv' has no rows.*Train for at least one epoch"),
        ("step,epoch,kind,loss\n", r"metrics.csv' has no rows"),
        ("a,b\n1,2\n", r"has no 'step' column.*Pass the workdir of an nnxfit run"),
        ("step,epoch,kind,loss\n2,0,train,nan\n", r"no finite metric values"),
    ],
    ids=["missing", "empty", "header-only", "foreign", "all-nan"],
)
def test_cli_bad_input_exits_2_with_the_reason(tmp_path, capsys, content, expected):
    if content is not None:
        (tmp_path / "metrics.csv").write_text(content)
    assert cli.main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nnxfit plot: error: ") and str(tmp_path) in err
    assert re.search(expected, err), err
    with pytest.raises(PlotError):
        plot_run(tmp_path)
    assert not (tmp_path / "plots").exists()  # nothing half-written


def test_cli_help_lists_the_plot_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    assert "plot" in capsys.readouterr().out
    assert cli.main([]) == 2  # no command: the help, on stderr
    assert "usage: nnxfit" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["plot"])  # WORKDIR missing: argparse's own error, exit 2
    assert e.value.code == 2


def test_csv_path_works_as_the_argument(run_dir, tmp_path):
    paths = plot_run(run_dir / "metrics.csv", out_dir=tmp_path)
    assert [p.name for p in paths] == ["loss.png", "accuracy.png", "overview.png"]


GREEN = np.array([0.173, 0.627, 0.173])  # "C2": a third run


def write_run(folder, losses, lr):
    folder.mkdir(parents=True)
    lines = ["step,epoch,kind,loss,val_loss"]
    for i, v in enumerate(losses):
        lines += [f"{4 * i + 2},{i},train,{v * 1.1},", f"{4 * i + 4},{i},epoch,{v},{v * 1.2}"]
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")
    (folder / "hparams.yaml").write_text(f"lr: {lr}\nwidth: 16\n")


def test_compare_draws_each_run_in_a_colour_of_its_own(tmp_path):
    write_run(tmp_path / "runs" / "a", [1.0, 0.6, 0.4, 0.3], lr=0.1)
    write_run(tmp_path / "runs" / "b", [1.2, 0.9, 0.8, 0.75], lr=0.2)
    runs = find_runs([tmp_path / "runs" / "a", tmp_path / "runs" / "b" / "metrics.csv"])
    # Labelled by folder and the hyperparameters that differ (width is the same).
    assert [r.label for r in runs] == ["a (lr=0.1)", "b (lr=0.2)"]

    out = plot_compare([tmp_path / "runs" / "a", tmp_path / "runs" / "b"], tmp_path / "c.png")
    assert out == tmp_path / "c.png"
    img = imread(out)
    assert img.shape[0] > 400 and img.shape[1] > 800  # two panels: loss, val_loss
    assert pixels_near(img, BLUE) > 300 and pixels_near(img, ORANGE) > 300
    assert pixels_near(img, GREEN) < 20  # two runs, two colours


def test_a_workdir_with_versions_plots_all_its_runs(tmp_path):
    for seed in (0, 1):  # the second fit moves the first to version_0
        nnxfit.Trainer(max_epochs=2, workdir=tmp_path, progress_bar=False, log_every_n_steps=2).fit(
            Classifier(seed=seed), ArrayLoader((X, Y), 16), val_data=ArrayLoader((X, Y), 32)
        )
    paths = plot_run(tmp_path)
    assert paths[-1] == tmp_path / "plots" / "runs.png"
    assert [r.label for r in find_runs([tmp_path])] == [
        "version_0",
        f"{tmp_path.name} (latest)",
    ]
    img = imread(paths[-1])
    assert pixels_near(img, BLUE) > 300 and pixels_near(img, ORANGE) > 300

    r = subprocess.run(  # the command line, with the output file named
        [sys.executable, "-m", "nnxfit", "plot", "--compare", str(tmp_path / "version_0"),
         str(tmp_path), "--out", str(tmp_path / "both.png")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(tmp_path / "both.png")]
    assert imread(tmp_path / "both.png").shape == img.shape  # the same runs, the same figure
