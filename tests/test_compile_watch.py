"""Recompilation guard (compile times logged once, one warning on a mid-fit recompile) and
the persistent compilation cache (a second process loads the step instead of compiling)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import warnings

import jax
import optax
import pytest
from jax._src import monitoring  # the listener getters are not public in jax 0.10.2
from models import Classifier, toy_data

import nnxfit
from nnxfit.compile_watch import CompileWatch, RecompileWarning, enable_compilation_cache
from nnxfit.data import ArrayLoader

x, y = toy_data(100)


class ShapeShifter:
    """Four batches per epoch whose batch size changes with the epoch (25, 20, 15, ...)."""

    def __init__(self, sizes):
        self.sizes, self.epoch = sizes, 0

    def __len__(self):
        return 4

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        bs = self.sizes[min(self.epoch, len(self.sizes) - 1)]
        for i in range(4):
            yield x[i * bs : (i + 1) * bs], y[i * bs : (i + 1) * bs]


def test_each_program_logged_once_with_its_compile_time(caplog, cold_compiles):
    cw = CompileWatch()
    tr = nnxfit.Trainer(max_epochs=3, progress_bar=False, callbacks=[cw])
    with caplog.at_level(logging.INFO, logger="nnxfit.compile"):
        tr.fit(Classifier(), ArrayLoader((x, y), batch_size=32))  # batches of 32 and a tail of 4
    lines = [r.getMessage() for r in caplog.records if r.name == "nnxfit.compile"]
    assert len(lines) == 2 == tr.programs.trace_count == len(cw.records)
    assert "float32[32, 8], int32[32]" in lines[0] and "float32[4, 8], int32[4]" in lines[1]
    for r in cw.records:
        assert r.kind == "single" and r.compile_s > 0 and r.trace_s > 0 and not r.cached
        assert r.epoch == 0


def test_new_shape_after_first_epoch_warns_once_naming_the_leaf():
    cw = CompileWatch()
    tr = nnxfit.Trainer(max_epochs=3, progress_bar=False, callbacks=[cw])
    with pytest.warns(RecompileWarning) as got:
        tr.fit(Classifier(), ShapeShifter([25, 20, 15]))
    msgs = [str(w.message) for w in got if issubclass(w.category, RecompileWarning)]
    assert len(msgs) == 1, msgs  # epoch 2 recompiles again, but the warning is shown once
    assert "step 4 (epoch 1)" in msgs[0]
    assert "batch[0] has shape (20, 8) (float32); earlier batches (25, 8)" in msgs[0]
    assert "drop_last=True" in msgs[0]
    assert [r.shapes[0][0] for r in cw.records] == [(25, 8), (20, 8), (15, 8)]


def test_shapes_seen_in_the_first_epoch_and_tail_groups_never_warn():
    # A short last batch (epoch 0), scans of 3 steps, a tail group of 2 steps at max_steps:
    # all expected compiles, none a data problem.
    tr = nnxfit.Trainer(max_steps=11, progress_bar=False, steps_per_execution=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecompileWarning)
        tr.fit(Classifier(), ArrayLoader((x, y), batch_size=30))
    cw = next(c for c in tr.cb if isinstance(c, CompileWatch))  # added by default
    assert {r.kind for r in cw.records} == {"single", "multi"}
    assert len(cw.records) == tr.programs.trace_count


def test_warn_false_records_without_warning():
    cw = CompileWatch(warn=False)
    tr = nnxfit.Trainer(max_epochs=2, progress_bar=False, callbacks=[cw])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecompileWarning)
        tr.fit(Classifier(), ShapeShifter([25, 20]))
    assert len(cw.records) == 2


def test_listeners_are_removed_after_fit_even_on_error():
    before = (len(monitoring.get_event_duration_listeners()), len(monitoring.get_event_listeners()))

    class Boom(nnxfit.Callback):
        def on_train_batch_end(self, trainer, module, step, logs):
            raise RuntimeError("boom")

    tr = nnxfit.Trainer(max_steps=3, progress_bar=False)
    tr.fit(Classifier(), ArrayLoader((x, y), batch_size=50))
    tr = nnxfit.Trainer(max_steps=3, progress_bar=False, callbacks=[Boom()])
    with pytest.raises(RuntimeError, match="boom"):
        tr.fit(Classifier(), ArrayLoader((x, y), batch_size=50))
    after = (len(monitoring.get_event_duration_listeners()), len(monitoring.get_event_listeners()))
    assert after == before
    assert tr.programs.on_trace is None


def test_enable_compilation_cache_rejects_a_file(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        enable_compilation_cache(f)


CHILD = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {tests!r})
    import jax
    from jax import monitoring
    import nnxfit
    from nnxfit.compile_watch import CompileWatch, enable_compilation_cache
    from nnxfit.data import ArrayLoader
    from models import Classifier, toy_data

    hits = []
    monitoring.register_event_listener(
        lambda e, **k: hits.append(e) if e == "/jax/compilation_cache/cache_hits" else None)
    jax.numpy.ones(3).block_until_ready()  # a compile before the cache is on must not matter
    enable_compilation_cache({cache!r})
    cw = CompileWatch()
    x, y = toy_data(64)
    nnxfit.Trainer(max_steps=4, progress_bar=False, callbacks=[cw]).fit(
        Classifier(), ArrayLoader((x, y), batch_size=16))
    print(json.dumps({{"hits": len(hits), "cached": [r.cached for r in cw.records]}}))
    """
)


def test_second_process_loads_the_step_from_the_persistent_cache(tmp_path):
    cache = tmp_path / "jax-cache"
    code = CHILD.format(tests=os.path.dirname(__file__), cache=str(cache))
    env = dict(os.environ, JAX_PLATFORMS="cpu")

    def run():
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    first = run()
    assert first["cached"] == [False]
    assert len(os.listdir(cache)) > 0, "the first run wrote no cache entry"
    second = run()
    assert second["cached"] == [True], second  # the train step came from disk
    assert second["hits"] >= 1


class InjectedLR(Classifier):
    def configure_optimizers(self):
        return optax.inject_hyperparams(optax.adam)(learning_rate=0.1)


class WriteLR(nnxfit.Callback):
    """At the end of epoch 0, writes a new learning rate into the optimizer state by hand,
    as ``make(old)`` builds it."""

    def __init__(self, make):
        self.make = make

    def on_train_epoch_end(self, trainer, module, epoch, logs):
        if epoch == 0:
            state = trainer.train_state()
            hp = state["opt"].hyperparams
            hp = {**hp, "learning_rate": self.make(hp["learning_rate"])}
            state["opt"] = state["opt"]._replace(hyperparams=hp)
            trainer.load_train_state(state)


def recompile_warnings(callback, val=True, epochs=2):
    cw = CompileWatch()
    tr = nnxfit.Trainer(max_epochs=epochs, progress_bar=False, callbacks=[cw, callback])
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        val_data = ArrayLoader((x, y), batch_size=50) if val else None
        tr.fit(InjectedLR(), ArrayLoader((x, y), batch_size=25), val_data=val_data)
    return cw, [w for w in got if issubclass(w.category, RecompileWarning)]


def test_a_committed_state_array_recompiles_without_a_trace_and_warns_per_program():
    # jax.device_put(..., sharding) commits the array: same types, new placement. jax
    # compiles the step again without tracing it, then once more when every output has
    # become committed; validation too.
    commit = lambda old: jax.device_put(jax.lax.full_like(old, 0.05), old.sharding)  # noqa: E731
    cw, got = recompile_warnings(WriteLR(commit))
    assert len(got) == 2, [str(w.message) for w in got]  # once per program
    train, val = (str(w.message) for w in got)
    assert "the train step was compiled again at step 4 (epoch 1)" in train
    assert (
        "opt.hyperparams['learning_rate']: float32[] (uncommitted) -> float32[] (committed to"
        in train
    )
    assert "trainer.set_hyperparameter(name, value)" in train
    assert "the validation step was compiled again at step 8 (epoch 1)" in val
    assert "params['net']['l1']['bias']: float32[16] (uncommitted) ->" in val
    assert got[0].filename == __file__  # the line that called fit
    untraced = [r for r in cw.records if not r.traced]
    assert untraced and all(r.done and r.compile_s > 0 and r.shapes == () for r in untraced)
    assert untraced[0].changed == (
        "opt.hyperparams['learning_rate']: float32[] (uncommitted) -> float32[] (committed to "
        "cpu:0)",
    )
    assert cw.eval_records[0].traced and not cw.eval_records[1].traced


def test_a_weak_type_change_is_named():
    # A Python float makes a weakly typed array (~float32): a new signature, traced again.
    cw, got = recompile_warnings(WriteLR(lambda old: jax.numpy.asarray(0.05)), val=False)
    assert len(got) == 1
    assert (
        "opt.hyperparams['learning_rate']: float32[] (uncommitted) -> ~float32[] (uncommitted)"
        in str(got[0].message)
    )
    assert [r.traced for r in cw.records] == [True, True]


def test_set_hyperparameter_never_warns():
    class SetLR(nnxfit.Callback):
        def on_train_epoch_end(self, trainer, module, epoch, logs):
            trainer.set_hyperparameter("learning_rate", 0.05 / (epoch + 1))

    cw, got = recompile_warnings(SetLR(), epochs=3)
    assert got == [] and len(cw.records) == 1 and len(cw.eval_records) == 1
