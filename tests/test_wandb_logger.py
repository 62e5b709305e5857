"""WandbLogger: real fits logged with the real wandb client in offline mode (no API key, no
network), read back from its offline run files with wandb's own record protos."""

import csv
import signal

import pytest
from models import Classifier, SignalAt, toy_data

import nnxfit
from nnxfit.callbacks import ModelCheckpoint, WandbLogger
from nnxfit.callbacks.wandb_logger import default_mode
from nnxfit.data import ArrayLoader

wandb = pytest.importorskip("wandb")
from wandb_files import read_run, run_dirs  # noqa: E402  (needs wandb's protos)

X, Y = toy_data(96)  # batch 16: 6 steps per epoch
FIT = dict(max_epochs=3, progress_bar=False, log_every_n_steps=2)


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """No key anywhere wandb looks, its own folders under tmp_path, no console capture."""
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture(scope="module", autouse=True)
def stop_service():
    yield
    wandb.teardown()  # ends wandb's service process now, not at interpreter exit


class Net(Classifier):
    def __init__(self, *, lr=1e-2, width=16):
        super().__init__(lr=lr)
        self.save_hyperparameters()


def data():
    return ArrayLoader((X, Y), 16, shuffle=True, seed=1)


def val():
    return ArrayLoader((X, Y), 32)


def csv_rows(workdir):
    with open(workdir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def expected_history(workdir) -> dict[int, dict]:
    """What the run's history should hold, from its metrics.csv (the same logs)."""
    out: dict[int, dict] = {}
    for r in csv_rows(workdir):
        row = out.setdefault(int(r["step"]), {})
        metrics = {k: float(v) for k, v in r.items() if k not in ("step", "epoch", "kind") and v}
        if r["kind"] == "train":
            row.update({f"train/{k}": v for k, v in metrics.items()})
        else:
            row.update(metrics, epoch=int(r["epoch"]))
    return out


def test_no_api_key_means_offline(tmp_path, monkeypatch):
    assert default_mode() == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password 0123abcd\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert default_mode() == "online"  # what `wandb login` leaves
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert default_mode() == "online"


def test_offline_run_holds_config_history_summary_and_exit_code(tmp_path):
    logger = WandbLogger(tags=["unit"])
    ckpt = ModelCheckpoint(monitor="val_loss")
    trainer = nnxfit.Trainer(workdir=tmp_path, callbacks=[logger, ckpt], **FIT)
    history = trainer.fit(Net(lr=0.02), data(), val_data=val())

    assert logger.mode == "offline"
    (folder,) = run_dirs(tmp_path / "wandb")  # under the workdir
    assert logger.run_dir == folder
    run = read_run(folder)
    assert run["run_id"] == logger.run_id
    assert run["config"]["lr"] == 0.02 and run["config"]["width"] == 16
    assert run["config"]["trainer"]["max_epochs"] == 3
    assert run["config"]["trainer"]["batch_size"] == 16

    # Every train log and epoch end at its step, the values of the fit's own logs.
    assert run["history"] == expected_history(tmp_path)
    assert sorted(run["history"]) == [2, 4, 6, 8, 10, 12, 14, 16, 18]
    assert [run["history"][s]["val_loss"] for s in (6, 12, 18)] == history.history["val_loss"]
    assert run["summary"]["checkpoint_dir"] == ckpt.directory
    assert run["summary"]["best_checkpoint"] == ckpt.best_model_path
    assert run["exit_code"] == 0


def test_an_exception_ends_the_run_failed(tmp_path):
    class Crash(nnxfit.Callback):
        def on_train_batch_end(self, trainer, module, step, logs):
            if step == 7:
                raise RuntimeError("crash at step 7")

    logger = WandbLogger()
    trainer = nnxfit.Trainer(workdir=tmp_path, callbacks=[logger, Crash()], **FIT)
    with pytest.raises(RuntimeError, match="crash at step 7"):
        trainer.fit(Net(), data())
    (folder,) = run_dirs(tmp_path / "wandb")
    run = read_run(folder)
    assert run["exit_code"] == 1
    assert sorted(run["history"]) == [2, 4, 6]  # all the fit logged before the crash


def test_interrupted_then_resumed_continues_the_run_without_duplicate_steps(tmp_path):
    def fit(extra, resume=False):
        logger = WandbLogger()
        cbs = [logger, ModelCheckpoint(), *extra]
        trainer = nnxfit.Trainer(workdir=tmp_path, callbacks=cbs, **FIT)
        trainer.fit(Net(), data(), val_data=val(), resume=resume)
        return logger

    with pytest.raises(nnxfit.TrainingInterrupted):
        fit([SignalAt(9, signal.SIGTERM)])  # a real SIGTERM, saved at step 9
    second = fit([], resume=True)

    first_dir, second_dir = run_dirs(tmp_path / "wandb")
    first, resumed = read_run(first_dir), read_run(second_dir)
    assert first["run_id"] == resumed["run_id"] == second.run_id  # the same W&B run
    assert first["exit_code"] == 255 and resumed["exit_code"] == 0
    assert sorted(first["history"]) == [2, 4, 6, 8]
    assert sorted(resumed["history"]) == [10, 12, 14, 16, 18]  # nothing at or before 9
    # Together, one uninterrupted run's history (metrics.csv equals it: test_csv_logger).
    assert {**first["history"], **resumed["history"]} == expected_history(tmp_path)
