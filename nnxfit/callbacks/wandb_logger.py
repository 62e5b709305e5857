"""``WandbLogger``: the fit as a Weights & Biases run, written with the real ``wandb`` client.

Install the client with ``pip install "nnxfit[wandb]"``.

Mode: ``mode=`` if given, else ``WANDB_MODE``, else ``"online"`` when an API key is
configured (``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE``, or a ``~/.netrc`` entry for the
W&B host, which ``wandb login`` writes) and ``"offline"`` otherwise: an offline run is written
to ``<dir>/wandb/offline-run-<time>-<id>/`` and uploaded later with
``wandb sync <that folder>``. ``dir`` defaults to the Trainer's ``workdir``, so the runs sit in
``workdir/wandb``, which stays at the top of the workdir when a fresh fit moves an earlier
run's files to ``workdir/version_N`` (each fit has its own run folder in it).

Content, as ``MLflowLogger``'s: the run's config holds the module's ``hparams`` and the
Trainer options (under ``trainer``); its history every train-interval log as
``train/<name>`` and every epoch end under the History names (``loss``, ``val_loss``, ...,
``epoch``), each at its step (W&B's ``step`` is the number of optimizer steps done), and
``Trainer.test``'s ``test_*``; its summary the checkpoint folder, the best checkpoint and its
score (``checkpoint_dir``, ``best_checkpoint``, ``best_score``, ``last_checkpoint``); its exit
code the status: 0 finished, 1 failed (an exception), 255 interrupted (wandb's own code for
Ctrl-C; SIGTERM too).

Resume. The run id is part of the logger's checkpointed state: a resumed fit continues the
same run (``wandb.init(id=..., resume="allow")``; offline, a new ``offline-run-*`` folder with
the same id, which ``wandb sync`` adds to that run). W&B keeps a run's steps increasing and
cannot delete what was logged: the resumed run logs nothing at or before the step it resumes
from (the checkpoint's), and nothing before the step the server reports the run has reached
(online). With an exact resume, what an interrupted run logged after its last checkpoint is
what the resumed run would log there; wandb keeps the first of the two.

Every other ``wandb.init`` argument passes through ``**kwargs`` (``entity``, ``name``,
``group``, ``tags``, ``notes``, ``settings``, ...). When a W&B run is already active in the
process (``wandb.run``, started by your script), the logger logs into it and leaves it open, as
Lightning's does (from a background thread). Otherwise the client runs in a process of its own
(``writer.TrackerProcess``, fed by a background thread): a fit never waits for it, except at
its end, for everything to be handed over, and wandb's Python work per row never holds the
fit's GIL. Only process 0 logs; nothing is logged under
``fast_dev_run``.
"""

from __future__ import annotations

import importlib.util
import netrc
import os
import secrets
import string
import sys
from typing import Any
from urllib.parse import urlparse

from nnxfit.callbacks.writer import (
    FAILED,
    FINISHED,
    KILLED,
    LoggerCallback,
    Row,
    RunStart,
    RunWriter,
    numbers,
)
from nnxfit.errors import ConfigError

INSTALL = "pip install 'nnxfit[wandb]' (or pip install wandb)"
EXIT_CODES = {FINISHED: 0, FAILED: 1, KILLED: 255}


class WandbLogger(LoggerCallback):
    """Logs the fit to Weights & Biases: config, history with steps, summary, exit code.

    ``project``: the W&B project. ``kwargs``: passed to ``wandb.init`` (``mode``, ``dir``,
    ``entity``, ``name``, ``tags``, ...). After a fit, ``run_id``, ``mode`` and ``run_dir``
    (the local run folder) name the run.
    """

    def __init__(self, project: str = "nnxfit", **kwargs: Any):
        super().__init__()
        if importlib.util.find_spec("wandb") is None:
            raise ConfigError(f"WandbLogger needs the wandb client: {INSTALL}.")
        for key in ("project", "resume", "resume_from", "fork_from"):
            if key in kwargs and key != "project":
                raise ConfigError(
                    f"WandbLogger: {key}= is set by the logger (a resumed fit continues its "
                    "run); pass the other wandb.init arguments."
                )
        self.project = project
        self.kwargs = dict(kwargs)
        self.mode: str | None = None  # of the current (or last) fit

    @property
    def run_id(self) -> str | None:
        """The W&B run of the current (or last) fit."""
        return self.state_dict().get("run_id")

    @property
    def run_dir(self) -> str | None:
        """The local folder of that run (``.../wandb/offline-run-<time>-<id>`` offline)."""
        return self.state_dict().get("run_dir")

    def make_writer(self, trainer, kind: str) -> RunWriter:
        mode = self.kwargs.get("mode") or os.environ.get("WANDB_MODE") or default_mode()
        self.mode = mode
        folder = self.kwargs.get("dir") or trainer.workdir
        if folder is not None:
            folder = os.path.abspath(os.fspath(folder))
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as e:
                raise ConfigError(
                    f"WandbLogger cannot write to {folder!r}: {e.strerror or e}. Pass a "
                    "writable Trainer workdir or WandbLogger(dir=...)."
                ) from e
        # A run the user's script started (wandb.run) can only be logged into from this
        # process; otherwise the client runs in a process of its own.
        wandb = sys.modules.get("wandb")
        user_run = getattr(wandb, "run", None) is not None
        return _WandbWriter(self.project, self.kwargs, mode, folder, user_run)

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.kwargs.items())
        return f"WandbLogger(project={self.project!r}{extra})"


def default_mode() -> str:
    """``"online"`` when a W&B API key is configured, else ``"offline"`` (never a prompt)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return "online"
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        found = netrc.netrc(os.environ.get("NETRC")).authenticators(host or "")
    except (OSError, netrc.NetrcParseError):
        found = None
    return "online" if found and found[2] else "offline"


def new_id() -> str:
    """A run id as wandb makes them: 8 characters of lowercase letters and digits."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


class _WandbWriter(RunWriter):
    flush_at_epoch_end = False

    def __init__(self, project, kwargs, mode: str, folder: str | None, user_run: bool):
        self.project = project
        self.kwargs = kwargs
        self.mode = mode
        self.folder = folder
        # wandb's own per-row Python work (~0.3 ms) runs in a process of its own.
        self.background = True if user_run else "process"
        self.run = None
        self.run_id: str | None = None
        self.run_dir: str | None = None
        self._own = True  # False: a run the user started; left open
        self._floor = -1  # steps at or below it are not logged (the resumed-from step)
        self._last = -1

    def open(self, start: RunStart) -> None:
        import wandb

        resumed = bool(start.state.get("run_id"))
        self.run_id = start.state.get("run_id") or self.kwargs.get("id") or new_id()
        params = start.all_params() if start.kind == "fit" else {}
        if wandb.run is not None:  # the user's own run: log into it
            self.run, self._own = wandb.run, False
            self.run_id = self.run.id
            if params:
                self.run.config.update(params, allow_val_change=True)
        else:
            kwargs = {k: v for k, v in self.kwargs.items() if k not in ("id", "dir")}
            kwargs.setdefault("mode", self.mode)
            self.run = wandb.init(
                project=self.project,
                id=self.run_id,
                resume="allow" if resumed else None,
                dir=self.folder,
                config=params or None,
                **kwargs,
            )
            if resumed and params:
                self.run.config.update(params, allow_val_change=True)
        files = getattr(self.run, "dir", None)  # <run folder>/files
        self.run_dir = os.path.dirname(files) if files else None
        if start.kind == "fit":
            summary = {"workdir": os.path.abspath(start.workdir or ".")}
            if start.checkpoint_dir:
                summary["checkpoint_dir"] = start.checkpoint_dir
            if start.resumed_from:
                summary["resumed_from"] = start.resumed_from
            self.run.summary.update(summary)
        if start.resume is not None:
            self._floor = start.step
        # Online, a resumed run starts at the step the server has; lower ones are dropped.
        self._floor = max(self._floor, int(getattr(self.run, "starting_step", 0) or 0) - 1)

    def write(self, rows: list[Row]) -> None:
        merged: dict[int, dict] = {}
        for r in rows:
            if r.step <= self._floor or r.step < self._last:
                continue
            values = numbers(r.metrics)
            if r.kind == "train":
                values = {f"train/{k}": v for k, v in values.items()}
            elif r.kind == "epoch":
                values["epoch"] = float(r.epoch)
            merged.setdefault(int(r.step), {}).update(values)
        for step in sorted(merged):
            self.run.log(merged[step], step=step)
            self._last = step

    def set_tags(self, tags: dict[str, str]) -> None:
        self.run.summary.update(tags)

    def close(self, status: str | None) -> None:
        if self.run is None or not self._own:
            return
        self.run.finish(exit_code=EXIT_CODES.get(status, 0))
        self.run = None

    def state(self) -> dict:
        return {"run_id": self.run_id, "run_dir": self.run_dir} if self.run_id else {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "run": None}  # sent to its process before it has a run
