"""MLflowLogger: real fits logged with the real mlflow client into local SQLite stores (no
server, no network), read back with ``MlflowClient``."""

import csv
import os
import shutil
import signal

import pytest
from models import Classifier, SignalAt, toy_data

import nnxfit
from nnxfit.callbacks import MLflowLogger, ModelCheckpoint
from nnxfit.callbacks.mlflow_logger import local_store_uri
from nnxfit.data import ArrayLoader

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

X, Y = toy_data(96)  # batch 16: 6 steps per epoch
FIT = dict(max_epochs=3, progress_bar=False, log_every_n_steps=2)


@pytest.fixture(autouse=True)
def no_server(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    """An empty SQLite store, made once: creating one runs MLflow's schema migrations, which
    take seconds. Tests copy it where they want a store (``fresh_store``)."""
    folder = tmp_path_factory.mktemp("template")
    MlflowClient(f"sqlite:///{folder}/mlflow.db").search_experiments()
    return folder / "mlflow.db"


@pytest.fixture
def fresh_store(empty_store):
    def put(workdir):
        (workdir / "mlruns").mkdir(parents=True, exist_ok=True)
        shutil.copy(empty_store, workdir / "mlruns" / "mlflow.db")
        return local_store_uri(workdir)

    return put


class Net(Classifier):
    def __init__(self, *, lr=1e-2, width=16):
        super().__init__(lr=lr)
        self.save_hyperparameters()

    def test_step(self, batch):
        return self.validation_step(batch)


def data():
    return ArrayLoader((X, Y), 16, shuffle=True, seed=1)


def val():
    return ArrayLoader((X, Y), 32)


def history_of(client, run_id) -> dict[str, list[tuple[int, float]]]:
    run = client.get_run(run_id)
    return {
        k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k))
        for k in run.data.metrics
    }


def expected(workdir) -> dict[str, list[tuple[int, float]]]:
    """The metrics an MLflow run of the fit should hold, from its metrics.csv."""
    out: dict[str, list] = {}
    with open(workdir / "metrics.csv", newline="") as f:
        for r in csv.DictReader(f):
            step = int(r["step"])
            metrics = {
                k: float(v) for k, v in r.items() if k not in ("step", "epoch", "kind") and v
            }
            if r["kind"] == "train":
                metrics = {f"train/{k}": v for k, v in metrics.items()}
            elif r["kind"] == "epoch":
                metrics["epoch"] = float(r["epoch"])
            for k, v in metrics.items():
                out.setdefault(k, []).append((step, v))
    return {k: sorted(v) for k, v in out.items()}


def test_params_metrics_steps_tags_and_status_in_the_workdir_store(tmp_path, fresh_store):
    uri = fresh_store(tmp_path)  # where MLflowLogger() writes by default
    logger, ckpt = MLflowLogger(run_name="first"), ModelCheckpoint(monitor="val_loss")
    trainer = nnxfit.Trainer(workdir=tmp_path, callbacks=[logger, ckpt], **FIT)
    module = Net(lr=0.02)
    history = trainer.fit(module, data(), val_data=val())
    assert logger.uri == uri

    client = MlflowClient(uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("nnxfit").experiment_id],
        filter_string=f"tags.`nnxfit.workdir` = '{tmp_path}'",
    )
    assert run.info.run_id == logger.run_id and run.info.run_name == "first"
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["lr"] == "0.02" and params["width"] == "16"
    assert params["trainer.max_epochs"] == "3" and params["trainer.batch_size"] == "16"
    tags = run.data.tags
    assert tags["nnxfit.checkpoint_dir"] == ckpt.directory
    assert tags["nnxfit.best_checkpoint"] == ckpt.best_model_path
    assert float(tags["nnxfit.best_score"]) == ckpt.best_model_score
    assert tags["nnxfit.monitor"] == "val_loss"

    got = history_of(client, logger.run_id)
    assert got == expected(tmp_path)  # every train log and epoch end, at its step
    assert [s for s, _ in got["train/loss"]] == [2, 4, 6, 8, 10, 12, 14, 16, 18]
    assert got["val_loss"] == list(zip([6, 12, 18], history.history["val_loss"], strict=True))

    # Trainer.test afterwards logs into the same run and leaves its status.
    trainer.test(module, val())
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED" and "test_loss" in run.data.metrics


class Crash(nnxfit.Callback):
    def __init__(self, at_step):
        self.at_step = at_step

    def on_train_batch_end(self, trainer, module, step, logs):
        if step == self.at_step:
            raise RuntimeError(f"crash at step {step}")


@pytest.mark.parametrize(
    "stop, error, status",
    [
        (Crash(7), RuntimeError, "FAILED"),
        (SignalAt(7, signal.SIGTERM), nnxfit.TrainingInterrupted, "KILLED"),
        (SignalAt(7, signal.SIGINT), nnxfit.TrainingInterrupted, "KILLED"),
    ],
    ids=["exception", "sigterm", "ctrl-c"],
)
def test_a_fit_that_ends_early_ends_its_run_with_the_right_status(
    tmp_path, empty_store, stop, error, status
):
    shutil.copy(empty_store, tmp_path / "store.db")
    uri = f"sqlite:///{tmp_path}/store.db"
    logger = MLflowLogger(tracking_uri=uri)
    trainer = nnxfit.Trainer(workdir=tmp_path, callbacks=[logger, stop], **FIT)
    with pytest.raises(error):
        trainer.fit(Net(), data())
    client = MlflowClient(uri)
    assert client.get_run(logger.run_id).info.status == status
    assert [s for s, _ in history_of(client, logger.run_id)["train/loss"]] == [2, 4, 6]
    assert not (tmp_path / "mlruns").exists()  # the store is where it was told


def test_sigterm_then_resume_continues_the_run_without_duplicate_steps(tmp_path, fresh_store):
    uri = fresh_store(tmp_path)

    def fit(max_epochs, extra, resume=False):
        logger = MLflowLogger()
        kw = {**FIT, "max_epochs": max_epochs}
        trainer = nnxfit.Trainer(
            workdir=tmp_path, callbacks=[logger, ModelCheckpoint(), *extra], **kw
        )
        trainer.fit(Net(), data(), val_data=val(), resume=resume)
        return logger

    with pytest.raises(nnxfit.TrainingInterrupted):
        fit(3, [SignalAt(9)])  # a real SIGTERM: checkpoint at step 9, run KILLED
    client = MlflowClient(uri)
    (first,) = client.search_runs([client.get_experiment_by_name("nnxfit").experiment_id])
    assert first.info.status == "KILLED"
    assert [s for s, _ in history_of(client, first.info.run_id)["train/loss"]] == [2, 4, 6, 8]

    logger = fit(4, [], resume=True)  # to train longer: max_epochs 3 -> 4
    assert logger.run_id == first.info.run_id  # the same run, continued
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED"
    got = history_of(client, logger.run_id)
    # One uninterrupted run's metrics (metrics.csv equals them: test_csv_logger), each step once.
    assert got == expected(tmp_path)
    assert [s for s, _ in got["train/loss"]] == list(range(2, 25, 2))
    # Params cannot change in MLflow: the first value stays, the new one is a tag.
    assert run.data.params["trainer.max_epochs"] == "3"
    assert run.data.tags["nnxfit.resumed.trainer.max_epochs"] == "3 -> 4"
    assert run.data.tags["nnxfit.resumed_from"].endswith("checkpoints/9")


def test_a_crash_after_the_checkpoint_leaves_no_duplicate_steps(tmp_path, fresh_store):
    """The crashed run logged step 12 (a train log and epoch 1's end) past its last
    checkpoint (step 10); the resumed run computes the same values there and does not log
    them again."""
    uri = fresh_store(tmp_path)

    def fit(extra, resume=False):
        logger = MLflowLogger()
        cbs = [logger, ModelCheckpoint(every_n_steps=5), *extra]
        nnxfit.Trainer(workdir=tmp_path, callbacks=cbs, **FIT).fit(
            Net(), data(), val_data=val(), resume=resume
        )
        return logger

    with pytest.raises(RuntimeError, match="crash at step 13"):
        fit([Crash(13)])
    logger = fit([], resume=True)
    client = MlflowClient(uri)
    got = history_of(client, logger.run_id)
    assert got == expected(tmp_path)  # each step once, the uninterrupted run's values
    assert client.get_run(logger.run_id).info.status == "FINISHED"


def test_versions_of_a_workdir_are_runs_of_one_store(tmp_path, fresh_store):
    """A fresh fit moves the earlier run's files to version_0; the store stays at the top,
    holding both runs, as `mlflow ui` shows them side by side."""
    uri = fresh_store(tmp_path)
    ids = []
    for lr in (0.02, 0.05):
        logger = MLflowLogger()
        nnxfit.Trainer(workdir=tmp_path, callbacks=[logger], **{**FIT, "max_epochs": 1}).fit(
            Net(lr=lr), data()
        )
        ids.append(logger.run_id)
    assert sorted(os.listdir(tmp_path / "version_0")) == ["hparams.yaml", "metrics.csv"]
    assert sorted(os.listdir(tmp_path / "mlruns")) == ["mlflow.db"]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("nnxfit").experiment_id])
    assert {r.info.run_id: r.data.params["lr"] for r in runs} == {ids[0]: "0.02", ids[1]: "0.05"}


def test_a_store_the_tracker_process_cannot_open_is_a_warning_and_the_fit_goes_on(tmp_path):
    """The client runs in a process of its own (``TrackerProcess``): its error comes back to
    the fit as one warning, and the fit and the other loggers go on."""
    (tmp_path / "a_file").write_text("")
    uri = f"sqlite:///{tmp_path}/a_file/mlflow.db"  # a folder that cannot be made
    trainer = nnxfit.Trainer(workdir=tmp_path, callbacks=[MLflowLogger(tracking_uri=uri)], **FIT)
    with pytest.warns(UserWarning, match="MLflowLogger could not start its run") as got:
        trainer.fit(Net(), data())
    assert len([w for w in got if "MLflowLogger" in str(w.message)]) == 1
    assert trainer.global_step == 18
    with open(tmp_path / "metrics.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f) if r["kind"] == "epoch"] == ["0", "1", "2"]


KILLED_FIT = """
import os, signal, sys
import nnxfit
from models import Classifier, toy_data
from nnxfit.callbacks import MLflowLogger
from nnxfit.data import ArrayLoader

class Die(nnxfit.Callback):

    def on_train_batch_end(self, trainer, module, step, logs):
        if step == 7:
            print(logger.run_id, flush=True)  # waits for the run to be open
            os.kill(os.getpid(), signal.SIGKILL)  # no hook, no atexit: the process is gone

logger = MLflowLogger(tracking_uri=sys.argv[1])
x, y = toy_data(96)
trainer = nnxfit.Trainer(callbacks=[logger, Die()], max_epochs=3, progress_bar=False)
trainer.fit(Classifier(), ArrayLoader((x, y), 16))
"""


def test_a_killed_fit_process_leaves_its_run_killed_not_running(tmp_path, empty_store):
    """SIGKILL on the fit's process: the tracker's process sees its pipe close, ends the run
    as KILLED and exits (MLflow would otherwise show it RUNNING forever)."""
    import subprocess
    import sys
    import time

    shutil.copy(empty_store, tmp_path / "store.db")
    uri = f"sqlite:///{tmp_path}/store.db"
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(here), here])}
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_FIT, uri], env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    run_id = proc.stdout.split()[0]
    client = MlflowClient(uri)
    deadline = time.monotonic() + 60
    while client.get_run(run_id).info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.2)
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.info.end_time is not None
