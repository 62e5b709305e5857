"""ThroughputMonitor: rates in logs and History, and the data-bottleneck warning."""

import time
import warnings

import pytest
from models import Classifier, toy_data

import nnxfit
from nnxfit.callbacks.throughput import DataBottleneckWarning, ThroughputMonitor
from nnxfit.errors import ConfigError

KEYS = ("steps_per_sec", "examples_per_sec", "data_wait_frac", "compute_frac")


def batches(n=192, size=8):
    x, y = toy_data(n)
    return [(x[i : i + size], y[i : i + size]) for i in range(0, n, size)]


class SlowData:
    """A re-iterable whose every batch takes ``delay`` seconds to arrive (a slow loader)."""

    def __init__(self, batches, delay):
        self.batches, self.delay = batches, delay

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for b in self.batches:
            time.sleep(self.delay)
            yield b


class BatchLogs(nnxfit.Callback):
    order = 50  # after the monitor
    reads_module = False

    def __init__(self):
        self.logs = []

    def on_train_batch_end(self, trainer, module, step, logs):
        self.logs.append((step, dict(logs)))


def fit(data, epochs=2, **kw):
    monitor, seen = ThroughputMonitor(window=kw.pop("window", 100)), BatchLogs()
    trainer = nnxfit.Trainer(max_epochs=epochs, callbacks=[monitor, seen], progress_bar=False, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = trainer.fit(Classifier(), data)
    bottleneck = [w for w in caught if issubclass(w.category, DataBottleneckWarning)]
    return trainer, monitor, history, seen.logs, bottleneck


def test_fast_data_logs_rates_and_does_not_warn():
    trainer, monitor, h, logs, warned = fit(batches(), log_every_n_steps=4)
    assert warned == [] and monitor.warned_at_step is None
    for k in KEYS:  # one value per epoch in History
        assert len(h.history[k]) == 2, k
    for e in range(2):
        assert h.history["steps_per_sec"][e] > 0
        assert h.history["examples_per_sec"][e] == pytest.approx(8 * h.history["steps_per_sec"][e])
        assert 0 <= h.history["data_wait_frac"][e] < 0.5
        assert 0 < h.history["compute_frac"][e] <= 1
    # On log steps (every 4th) the rates sit next to the loss; other calls stay empty.
    logged = [(s, lg) for s, lg in logs if lg]
    assert [s for s, _ in logged] == list(range(4, 49, 4))
    assert all(not lg for s, lg in logs if s % 4)
    assert all(set(KEYS) <= set(lg) for _, lg in logged)
    assert trainer.data_wait_seconds > 0


def test_slow_data_warns_once_and_names_the_numbers():
    delay = 0.02
    data = SlowData(batches(n=160), delay)  # 20 batches per epoch, 20 ms each
    trainer, monitor, h, logs, warned = fit(data, epochs=2, log_every_n_steps=4)
    assert len(warned) == 1, [str(w.message) for w in warned]  # once per fit, not per epoch
    msg = str(warned[0].message)
    assert "input pipeline is the bottleneck" in msg and "prefetch" in msg, msg
    assert monitor.warned_at_step is not None and monitor.warned_at_step <= 20
    for e in range(2):
        assert h.history["data_wait_frac"][e] > 0.7
        # 20 ms per batch caps training at 50 steps/s.
        assert h.history["steps_per_sec"][e] < 1 / delay
    # The Trainer's clock saw every sleep of the first epoch at least.
    assert trainer.data_wait_seconds >= 20 * delay


def test_steps_per_execution_and_accumulation_count_optimizer_steps():
    _, _, h, logs, warned = fit(
        batches(), epochs=1, steps_per_execution=2, grad_accum_steps=2, log_every_n_steps=2
    )
    # 24 batches -> 12 optimizer steps of 2 batches -> 6 calls of 2 steps.
    assert [s for s, _ in logs] == [2, 4, 6, 8, 10, 12]
    sps = h.history["steps_per_sec"][0]
    assert h.history["examples_per_sec"][0] == pytest.approx(sps * 16)  # 8 x 2 per step
    assert warned == []


def test_bad_arguments():
    with pytest.raises(ConfigError, match="window"):
        ThroughputMonitor(window=0)
    with pytest.raises(ConfigError, match="warn_data_frac"):
        ThroughputMonitor(warn_data_frac=1.5)
