"""``MLflowLogger``: the fit as an MLflow run, written with the real ``mlflow`` client.

Install the client with ``pip install "nnxfit[mlflow]"``: ``mlflow-skinny`` (the tracking
client, without the server) and the SQLAlchemy/alembic pair its SQLite store needs. The UI is
in the full package: ``pip install "nnxfit[mlflow-ui]"`` (``mlflow``), then
``mlflow ui --backend-store-uri sqlite:///WORKDIR/mlruns/mlflow.db``.

Where: ``tracking_uri``, else the ``MLFLOW_TRACKING_URI`` environment variable, else a local
store in ``workdir/mlruns``: the SQLite database ``mlflow.db`` (MLflow's own default backend
since its file store went into maintenance mode) and ``artifacts/``; ``local_store_uri(workdir)``
is its URI. That store stays at the top of the workdir when a fresh fit moves an earlier run's
files to ``workdir/version_N`` (``nnxfit.runs``): one store, one experiment, a run per fit,
compared side by side in ``mlflow ui``, as MLflow users expect.

What a run holds (``MlflowClient.log_batch``, from the tracker's process):

* params: the module's ``hparams`` (``self.save_hyperparameters()``) and the Trainer options
  as ``trainer.<option>`` (nested values flattened with ``.``, lists as JSON text);
* metrics, each with its step (optimizer steps done): every train-interval log as
  ``train/<name>`` (``train/loss``), every epoch end under the History names (``loss``,
  ``accuracy``, ``val_loss``, ``lr``, ... and ``epoch``), and ``Trainer.test``'s ``test_*``;
* tags: ``nnxfit.workdir``, ``nnxfit.module``, and with a ``ModelCheckpoint``
  ``nnxfit.checkpoint_dir``, ``nnxfit.best_checkpoint``, ``nnxfit.best_score``,
  ``nnxfit.monitor`` and ``nnxfit.last_checkpoint`` (updated as they change);
  ``nnxfit.resumed_from`` on a resumed fit;
* status: ``FINISHED``, ``KILLED`` (SIGTERM/Ctrl-C: ``TrainingInterrupted``) or ``FAILED``
  (an exception).

Resume. The run id is part of the logger's checkpointed state, so ``fit(..., resume=True)``
continues the same run (status back to ``RUNNING``). MLflow cannot delete logged points, so
the resumed run does not log again what the store already has: per metric, nothing at or
before the last step the store holds. A resume is exact (the resumed fit computes bit for bit
what the uninterrupted one would), so the points an interrupted run logged after its last
checkpoint (a crash or kill between checkpoints) are the values the resumed run would log
there: they stay, and the resumed run's own points continue after them. Only a fit that ended
*inside* an epoch (``max_steps``, ``should_stop``) leaves a point the uninterrupted run would
not have: that partial epoch's end (History names at the step it stopped at), which the
resumed run then ends again, later. Parameters cannot change in MLflow either: one that a
resumed fit changes (``trainer.max_epochs`` raised to train longer) keeps its first value, and
the new one is a tag ``nnxfit.resumed.<name>``.

A fit never waits for the client: rows go on a queue, and a thread sends what gathered each
second (``interval``) in one call to the client, which runs in a process of its own
(``writer.TrackerProcess``: its SQLAlchemy work never holds the fit's GIL, and if the fit's
process is killed the run still ends ``KILLED``); the end of the fit waits until everything
is written. A
client error (a server that is down) is a warning, never the end of the fit. Only process 0
logs; nothing is logged under ``fast_dev_run``.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
from typing import Any

from nnxfit.callbacks.writer import LoggerCallback, Row, RunStart, RunWriter, default_dir, numbers
from nnxfit.errors import ConfigError

INSTALL = "pip install 'nnxfit[mlflow]' (mlflow-skinny with the SQLite store's sqlalchemy)"
STORE = "mlruns"  # the local store's folder in the workdir: mlflow.db and artifacts/
DB = "mlflow.db"


def local_store_uri(workdir: str | os.PathLike) -> str:
    """The tracking URI of the local store ``MLflowLogger`` writes in ``workdir`` by default
    (``sqlite:////abs/workdir/mlruns/mlflow.db``): pass it to ``MlflowClient`` or
    ``mlflow ui --backend-store-uri``."""
    return "sqlite:///" + os.path.abspath(os.path.join(workdir, STORE, DB))


class MLflowLogger(LoggerCallback):
    """Logs the fit to MLflow: params, metrics with their steps, checkpoint tags, status.

    ``experiment``: the experiment's name (created if missing). ``run_name``: the run's name
    (MLflow picks one when None). ``tracking_uri``: a server (``http://host:5000``), a store
    (``file:///path``, ``sqlite:///mlflow.db``), or None for ``MLFLOW_TRACKING_URI`` or
    ``workdir/mlruns``. ``tags``: extra tags for the run. After a fit, ``run_id`` names the
    run (``MlflowClient(tracking_uri).get_run(logger.run_id)``).
    """

    def __init__(
        self,
        experiment: str = "nnxfit",
        run_name: str | None = None,
        tracking_uri: str | os.PathLike | None = None,
        *,
        tags: dict[str, Any] | None = None,
    ):
        super().__init__()
        if importlib.util.find_spec("mlflow") is None:
            raise ConfigError(f"MLflowLogger needs the mlflow client: {INSTALL}.")
        if not experiment:
            raise ConfigError("MLflowLogger(experiment=...) is empty; pass a name, e.g. 'nnxfit'.")
        self.experiment = str(experiment)
        self.run_name = run_name
        self.tracking_uri = os.fspath(tracking_uri) if tracking_uri is not None else None
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.uri: str | None = None  # the store of the current (or last) fit

    @property
    def run_id(self) -> str | None:
        """The MLflow run of the current (or last) fit."""
        return self.state_dict().get("run_id")

    @property
    def experiment_id(self) -> str | None:
        return self.state_dict().get("experiment_id")

    def make_writer(self, trainer, kind: str) -> RunWriter:
        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        artifacts = None
        if not uri:
            folder = default_dir(trainer, STORE, "MLflowLogger", "MLflowLogger(tracking_uri=...)")
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as e:
                raise ConfigError(
                    f"MLflowLogger cannot create its local store {folder!r}: {e.strerror or e}. "
                    "Pass a writable Trainer workdir or MLflowLogger(tracking_uri=...)."
                ) from e
            uri = local_store_uri(trainer.workdir)
            artifacts = pathlib.Path(folder, "artifacts").as_uri()
        self.uri = uri
        return _MLflowWriter(
            uri, artifacts, self.experiment, self.run_name, self.tags, trainer.workdir
        )

    def __repr__(self) -> str:
        return (
            f"MLflowLogger(experiment={self.experiment!r}, run_name={self.run_name!r}, "
            f"tracking_uri={self.tracking_uri!r})"
        )


class _MLflowWriter(RunWriter):
    background = "process"  # sqlalchemy's work per metric would hold the fit's GIL
    flush_at_epoch_end = False

    def __init__(self, uri, artifacts, experiment, run_name, tags, workdir):
        self.uri = uri
        self.artifacts = artifacts
        self.experiment = experiment
        self.run_name = run_name
        self.tags = tags
        self.workdir = workdir
        self.client = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._have: dict[str, int] = {}  # metric -> last step the store held at open
        self._own_run = False  # a run created for a test alone: ended at close

    def open(self, start: RunStart) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        from nnxfit.hparams import flatten

        client = self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment_id = self._experiment(client)
        run = None
        run_id = start.state.get("run_id")
        if run_id:
            try:
                run = client.get_run(run_id)
            except MlflowException:
                run = None  # another store: a new run (said in the tag nnxfit.resumed_from)
        tags = {"nnxfit.workdir": os.path.abspath(start.workdir or "."), **self.tags}
        if start.module_name:
            tags["nnxfit.module"] = start.module_name
        if start.checkpoint_dir:
            tags["nnxfit.checkpoint_dir"] = start.checkpoint_dir
        if start.resumed_from:
            tags["nnxfit.resumed_from"] = start.resumed_from
        if run is not None:
            self.run_id = run.info.run_id
            if start.kind == "fit":
                client.update_run(self.run_id, status="RUNNING")
                for key in run.data.metrics:
                    history = client.get_metric_history(self.run_id, key)
                    self._have[key] = max((m.step for m in history), default=-1)
            have = dict(run.data.params)
        else:
            name = self.run_name
            if start.kind == "test":
                name = name or f"{start.module_name or 'nnxfit'} test"
                self._own_run = True
            run = client.create_run(self.experiment_id, run_name=name, tags=tags)
            self.run_id = run.info.run_id
            have = {}
        if start.kind != "fit":
            return
        params, changed = [], []
        for k, v in flatten(start.all_params()).items():
            value = str(v)[:MAX_PARAM_VAL_LENGTH]
            if k not in have:
                params.append(Param(k, value))
            elif have[k] != value:
                changed.append(RunTag(f"nnxfit.resumed.{k}", f"{have[k]} -> {value}"))
        run_tags = [RunTag(k, v) for k, v in tags.items()] + changed
        for i in range(0, max(len(params), len(run_tags)), 100):
            client.log_batch(self.run_id, params=params[i : i + 100], tags=run_tags[i : i + 100])

    def _experiment(self, client) -> str:
        from mlflow.exceptions import MlflowException

        name = self.experiment
        exp = client.get_experiment_by_name(name)
        if exp is None:
            try:
                return client.create_experiment(name, artifact_location=self.artifacts)
            except MlflowException:  # created meanwhile by another process
                exp = client.get_experiment_by_name(name)
        if exp.lifecycle_stage == "deleted":
            raise ConfigError(
                f"MLflow experiment {name!r} in {self.uri} is deleted; restore it "
                f"(MlflowClient().restore_experiment({exp.experiment_id!r})) or log to another "
                "experiment name."
            )
        return exp.experiment_id

    def write(self, rows: list[Row]) -> None:
        from mlflow.entities import Metric

        metrics = []
        for r in rows:
            values = numbers(r.metrics)
            if r.kind == "train":
                values = {f"train/{k}": v for k, v in values.items()}
            elif r.kind == "epoch":
                values["epoch"] = float(r.epoch)
            stamp = int(r.time * 1000)
            for k, v in values.items():
                if r.step <= self._have.get(k, -1):
                    continue  # the store has it: logged by the run this one resumes
                metrics.append(Metric(k, v, stamp, int(r.step)))
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(f"nnxfit.{k}", v) for k, v in tags.items()])

    def close(self, status: str | None) -> None:
        if self.run_id is None:
            return
        if status is not None:
            self.client.set_terminated(self.run_id, status)
        elif self._own_run:
            self.client.set_terminated(self.run_id, "FINISHED")

    def state(self) -> dict:
        if self.run_id is None:
            return {}
        return {
            "run_id": self.run_id,
            "experiment_id": self.experiment_id,
            "tracking_uri": self.uri,
        }
