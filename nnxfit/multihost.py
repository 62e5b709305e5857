"""What the processes of one fit under ``jax.distributed`` agree on, and how.

Every process runs the same fit (SPMD): the same calls, hooks and saves, in the same order.
Where a process decides from its own view of something (a metric it read, a folder it
listed, a signal only it received, how many batches its loader yielded), the processes
agree explicitly, through the ``jax.distributed`` key-value store, never per step:

* ``barrier(tag)`` and ``agreed(tag, value)`` (process 0's value, to every process): at
  checkpoint saves, so that top-k and ``save_last`` decide from process 0's metrics and a
  folder moved aside by process 0 is gone before the others list it; ``orbax_options``
  gives each orbax manager barriers of its own;
* ``check_batch_counts``: before training, the loaders' lengths (``len``) must be equal;
  ``check_epoch_batches``: for loaders without one, the counts at each epoch's end;
* ``StopAgreement``: a SIGTERM/SIGINT delivered to one process stops every process after
  the same step (``interrupt.Signals``);
* ``explain_failure``: when a collective fails because a process is gone (killed, out of
  memory), the survivors find which one by a roll call and say so, with the last complete
  checkpoint; ``jax.distributed`` ends them after its heartbeat timeout at the latest.

The keys are numbered by a per-process counter of each tag: the processes call these in the
same order, so the n-th barrier of a tag is the same barrier everywhere. In a single
process everything here returns at once.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import threading
import time
from typing import Any

from nnxfit.errors import BatchError, ProcessSyncError

PREFIX = "nnxfit"
# How long a process waits for the others at an agreement point before it gives up (one
# that died is reported by jax.distributed's heartbeat well before this).
TIMEOUT_S = 600.0
# How long a process whose collective failed waits for the others to answer a roll call.
LOST_WAIT_S = 3.0
# How long a process at the end of an epoch waits for the others to get there.
EPOCH_WAIT_S = 120.0
_counters: collections.Counter = collections.Counter()
_lock = threading.Lock()


def process_count() -> int:
    import jax

    return jax.process_count()


def process_index() -> int:
    import jax

    return jax.process_index()


def client():
    """The ``jax.distributed`` client, or None outside a multi-process run."""
    from jax._src import distributed

    return distributed.global_state.client


def active() -> bool:
    return process_count() > 1 and client() is not None


def _key(tag: str) -> str:
    with _lock:
        _counters[tag] += 1
        n = _counters[tag]
    return f"{PREFIX}/{tag}/{n}"


def _timeout_ms(timeout_s: float | None) -> int:
    return int(1000 * (TIMEOUT_S if timeout_s is None else timeout_s))


def barrier(tag: str, timeout_s: float | None = None) -> None:
    """Waits until every process reached the same barrier (the n-th one of ``tag``)."""
    if not active():
        return
    key = _key(f"barrier/{tag}")
    try:
        client().wait_at_barrier(key, _timeout_ms(timeout_s))
    except Exception as e:
        raise ProcessSyncError(
            f"process {process_index()} waited {timeout_s or TIMEOUT_S:.0f} s at {key!r} for the "
            f"other processes of the fit and gave up: {e}. A process that crashed or hangs "
            "is named in its own log; restart every process with fit(..., resume=True)."
        ) from e


def agreed(tag: str, value: Any, timeout_s: float | None = None) -> Any:
    """Process 0's ``value`` (JSON), on every process."""
    if not active():
        return value
    key = _key(f"agree/{tag}")
    c = client()
    if process_index() == 0:
        c.key_value_set(key, json.dumps(value))
        return value
    try:
        return json.loads(c.blocking_key_value_get(key, _timeout_ms(timeout_s)))
    except Exception as e:
        raise ProcessSyncError(
            f"process {process_index()} waited for process 0's {tag} ({key!r}) and gave up: "
            f"{e}. Process 0 crashed or hangs (its log says why); restart every process with "
            "fit(..., resume=True)."
        ) from e


def gathered(tag: str, value: Any, timeout_s: float | None = None) -> list:
    """Every process's ``value`` (JSON), by process index, on every process."""
    if not active():
        return [value]
    key = _key(f"gather/{tag}")
    c, me = client(), process_index()
    c.key_value_set(f"{key}/{me}", json.dumps(value))
    out = []
    for p in range(process_count()):
        try:
            out.append(json.loads(c.blocking_key_value_get(f"{key}/{p}", _timeout_ms(timeout_s))))
        except Exception as e:
            raise ProcessSyncError(
                f"process {me} waited for process {p}'s {tag} ({key!r}) and gave up: {e}. "
                f"Process {p} crashed or hangs (its log says why)."
            ) from e
    return out


def orbax_options():
    """orbax's ``MultiprocessingOptions`` for a new ``CheckpointManager``: process 0 writes the
    metadata and commits, every process writes its shards. Each manager gets a barrier
    prefix of its own (the n-th manager this process opened: the same n on every process),
    since two ``ModelCheckpoint``s saving at once would otherwise meet at orbax's barriers
    of the same name ("Barrier ... is already ongoing")."""
    from orbax.checkpoint import options

    if not active():
        return options.MultiprocessingOptions()
    prefix = _key("orbax").replace("/", "_")
    return options.MultiprocessingOptions(primary_host=0, barrier_sync_key_prefix=prefix)


# ---------------------------------------------------------------------------- lost process ---
def missing_processes(wait_s: float = LOST_WAIT_S) -> list[int]:
    """The processes that do not answer a roll call within ``wait_s`` (every process still
    running calls it: a collective of theirs failed too). Process 0 when the coordinator it
    runs cannot be reached at all."""
    c, me, n = client(), process_index(), process_count()
    key = _key("roll")
    try:
        c.key_value_set(f"{key}/{me}", "here", allow_overwrite=True)
    except Exception:
        return [0]  # the key-value store lives in process 0
    deadline = time.monotonic() + wait_s
    gone = []
    for p in range(n):
        left = max(0.05, deadline - time.monotonic())
        try:
            c.blocking_key_value_get(f"{key}/{p}", int(1000 * left))
        except Exception:
            gone.append(p)
    return gone


def explain_failure(trainer, error: BaseException) -> None:
    """A multi-process fit failed in the runtime (a collective whose peer is gone): find
    which processes are gone and say so, with the checkpoint a restart resumes from (a note
    on ``error`` and a line on stderr: jax may end this process before the traceback)."""
    if not active() or not _runtime_failure(error):
        return
    gone = missing_processes()
    if not gone:
        return
    last = [os.path.join(d, str(s[-1])) for d in trainer._saving_dirs() if (s := _steps(d))]
    who = ", ".join(str(p) for p in gone)
    text = (
        f"process {who} of {process_count()} is gone (it stopped answering; this process's "
        f"collective with it failed: {_first_line(error)}). The fit cannot go on without it. "
        + (
            f"The last complete checkpoint is intact: {', '.join(last)}. "
            if last
            else "No checkpoint was complete yet. "
        )
        + "Restart every process with fit(..., resume=True)."
    )
    error.add_note(f"nnxfit: {text}")
    try:
        sys.stderr.write(f"nnxfit [process {process_index()}]: {text}\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # noqa: S110 - the note still carries it
        pass


def _steps(directory: str) -> list[int]:
    """Complete checkpoints (orbax renames a step folder to its number once committed)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(int(n) for n in names if n.isdigit())


def _runtime_failure(error: BaseException) -> bool:
    import jax

    seen = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, jax.errors.JaxRuntimeError):
            return True
        e = e.__cause__ or e.__context__
    return False


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__


# ------------------------------------------------------------------------- per-process data ---
def check_batch_counts(train_data: Any, val_data: Any) -> None:
    """Every process's loaders yield the same number of batches: a process with one batch
    more would wait in a collective for the others forever. Compared by ``len`` before
    training (a loader without ``len`` is not compared)."""
    if not active():
        return
    from nnxfit.data import num_batches

    mine = [num_batches(train_data), None if val_data is None else num_batches(val_data)]
    counts = gathered("batch-counts", mine)
    for i, where in enumerate(("train", "validation")):
        per = [c[i] for c in counts]
        if None in per or len(set(per)) == 1:
            continue
        most = max(set(per), key=per.count)
        odd = [p for p, n in enumerate(per) if n != most]
        detail = ", ".join(f"process {p}: {n}" for p, n in enumerate(per))
        raise BatchError(
            f"the processes' {where} data yield different numbers of batches per epoch "
            f"({detail}); process {odd[0]} differs. Each process must feed its part of every "
            "global batch, the same number of batches: give each process an equal shard "
            "(ArrayLoader(..., shard_by_process=True) splits every global batch; with grain, "
            "ShardByJaxProcess and drop_remainder=True)."
        )


def check_epoch_batches(data: Any, epoch: int, count: int) -> None:
    """At the end of an epoch whose loader ran out: every process yielded ``count`` batches.
    Only for loaders without ``len`` (those with one were compared before training); one
    key-value exchange per epoch. A process with more batches is still sending them and
    answers a little later; one stuck in a collective for a batch the others never sent
    does not answer, which is an error too, after ``EPOCH_WAIT_S``."""
    from nnxfit.data import num_batches

    if not active() or num_batches(data) is not None:
        return
    try:
        counts = gathered("epoch-batches", count, timeout_s=EPOCH_WAIT_S)
    except ProcessSyncError as e:
        raise BatchError(
            f"process {process_index()} yielded {count} train batches in epoch {epoch}, and "
            f"another process did not reach the end of that epoch within {EPOCH_WAIT_S:.0f} s "
            f"({e}). Most likely it has more batches and waits in a collective for this "
            "process: every process must yield the same number of batches per epoch."
        ) from e
    if len(set(counts)) > 1:
        detail = ", ".join(f"process {p}: {n}" for p, n in enumerate(counts))
        raise BatchError(
            f"the processes' train data yielded different numbers of batches in epoch {epoch} "
            f"({detail}). Each process must feed its part of every global batch, the same "
            "number of batches: give each process an equal shard "
            "(ArrayLoader(..., shard_by_process=True); with grain, ShardByJaxProcess and "
            "drop_remainder=True)."
        )


# ----------------------------------------------------------------------- coordinated stop ---
class StopAgreement:
    """Stops every process of a fit after the same step when one of them gets a signal.

    The process a signal reaches publishes the step it stops after (``Signals.stop_step``)
    and wakes a watcher thread on each other process (a blocking key-value get: no cost
    while nothing happens). A woken process marks the signal as its own would and publishes
    its step too. Before it sends its next call, each process waits for every step
    published and stops after the largest: no process has gone past it, and each can
    reach it (the calls in between are the same on every process). The signal's number
    travels with it, so every process exits as that signal asks (143 for SIGTERM).
    """

    def __init__(self, trainer, signals, on_remote=None):
        self.trainer, self.signals = trainer, signals
        self.on_remote = on_remote  # (signum, origin): said when another process's signal came
        self.client = client()
        self.me, self.n = process_index(), process_count()
        self.key = _key("stop")
        self.lock = threading.RLock()  # the signal handler may run inside its own hold
        self.origin: int | None = None  # the process the signal reached first
        self.target: int | None = None
        self._thread = threading.Thread(target=self._watch, name="nnxfit-stop", daemon=True)
        self._thread.start()

    # -- learning of a signal -------------------------------------------------------------
    def local(self, signum: int) -> None:
        """The signal handler (main thread) noted ``signum``: tell the others."""
        with self.lock:
            self.origin = self.me
            self._publish()
            for p in range(self.n):
                if p != self.me:
                    self.client.key_value_set(
                        f"{self.key}/wake/{p}", f"{signum}:{self.me}", allow_overwrite=True
                    )

    def _watch(self) -> None:
        try:
            value = self.client.blocking_key_value_get(f"{self.key}/wake/{self.me}", 2**31 - 1)
        except Exception:  # the client shut down; no signal will come
            return
        if value == "end":
            return
        signum, origin = (int(v) for v in value.split(":"))
        s = self.signals
        with self.lock:
            if s.received is not None:
                return  # a signal of its own came first and was published
            # Marked received before the step is read: the loop reads ``sending`` before it
            # checks ``received``, so either this reads the call being sent, or the loop sees
            # the signal before it sends that call (and waits for the agreement).
            s.note(signum, self.trainer.dispatch_step)
            s.remote = origin
            self.origin = origin
            self._publish()
        if self.on_remote is not None:
            self.on_remote(signum, origin)

    def _publish(self) -> None:
        s = self.signals
        self.client.key_value_set(f"{self.key}/at/{self.me}", f"{s.stop_step}:{s.stop_epochs}")

    # -- agreeing -------------------------------------------------------------------------
    def resolve(self) -> tuple[int, int]:
        """``(step, epoch ends)`` every process stops after; waits until every process
        published its own."""
        if self.target is not None:
            return self.target
        steps = []
        for p in range(self.n):
            try:
                got = self.client.blocking_key_value_get(f"{self.key}/at/{p}", _timeout_ms(None))
            except Exception as e:
                raise ProcessSyncError(
                    f"process {self.me} stopping on a signal waited {TIMEOUT_S:.0f} s for the "
                    f"step process {p} stops after, and gave up: {e}. Process {p} crashed or "
                    "hangs (its log says why); the last complete checkpoint is intact."
                ) from e
            steps.append(tuple(int(v) for v in got.split(":")))
        self.target = max(steps)
        self.signals.stop_step, self.signals.stop_epochs = self.target
        return self.target

    def close(self) -> None:
        """Ends the watcher (the fit is over)."""
        try:
            self.client.key_value_set(f"{self.key}/wake/{self.me}", "end", allow_overwrite=True)
        except Exception:  # noqa: S110 - the client is already gone: so is the watcher's get
            pass
        self._thread.join(timeout=5.0)
