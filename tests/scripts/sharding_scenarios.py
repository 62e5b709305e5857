"""Runs nnxfit on a 4-device CPU mesh and on one device; prints the results as one JSON line.

Usage: python sharding_scenarios.py SCENARIO [SCENARIO ...]   (run by tests/test_sharding.py)

The device count must be fixed before jax starts, which is why this runs in its own process.
Each scenario records its numbers (or its error) under its name, so that one failure does not
hide the others.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # tests/models.py

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax import monitoring  # noqa: E402
from models import Classifier, toy_data  # noqa: E402

import nnxfit  # noqa: E402
from nnxfit.data import ArrayLoader  # noqa: E402

MESH = jax.make_mesh((4,), ("data",))  # jax's default: Explicit axes
# FSDP through annotations relies on the compiler to place the all-gathers: Auto axes.
AUTO_MESH = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
COMPILES: list[str] = []
monitoring.register_event_duration_secs_listener(
    lambda event, secs, **kw: (
        COMPILES.append(kw.get("fun_name", ""))
        if event == "/jax/core/compile/backend_compile_duration"
        else None
    )
)


def rel_diff(a, b) -> float:
    """Largest max|a - b| / max(max|b|, 1e-3) over the leaves of two pytrees: relative to each
    array's scale, with a floor for arrays that stay near 0 (a bias in front of BatchNorm
    gets zero gradient, so both runs move it by float noise only)."""
    worst = 0.0
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
        scale = max(float(np.max(np.abs(v), initial=0.0)), 1e-3)
        worst = max(worst, float(np.max(np.abs(u - v), initial=0.0)) / scale)
    return worst


def float_state(module):
    return jax.tree.map(np.asarray, nnx.state(module, nnx.Any(nnx.Param, nnx.BatchStat)))


def history_diff(h1, h4) -> float:
    assert h1.history.keys() == h4.history.keys(), (h1.history.keys(), h4.history.keys())
    return max(rel_diff(h1.history[k], h4.history[k]) for k in h1.history)


def fit_pair(make, data, val, **options):
    """The same fit on one device and on the 4-device mesh."""
    out = []
    for mesh in (None, MESH):
        module = make()
        trainer = nnxfit.Trainer(mesh=mesh, progress_bar=False, **options)
        before = len(COMPILES)
        history = trainer.fit(module, data, val_data=val)
        steps = sum(name == "jit(_single)" or name == "jit(_multi)" for name in COMPILES[before:])
        out.append((module, trainer, history, steps))
    return out


# -- scenarios -------------------------------------------------------------------------------
def data_parallel() -> dict:
    """BatchNorm + dropout + SGD; ragged validation batches (30 = 28 sharded + 2 replicated)."""
    x, y = toy_data(96)
    train = ArrayLoader((x, y), 16, shuffle=True, seed=1)
    val = ArrayLoader((x[:66], y[:66]), 30)  # batches of 30, 30, 6
    make = lambda: Classifier(dropout=0.2, batchnorm=True, opt="sgd", lr=0.1)  # noqa: E731
    (m1, t1, h1, _), (m4, t4, h4, compiles) = fit_pair(make, train, val, max_epochs=3)
    leaves = t4.carry.leaves
    batch = t4.placement.put_batch([x[:16]])[0]
    standalone = Classifier(dropout=0.2, batchnorm=True, seed=3)
    before = len(COMPILES)
    v1 = t1.validate(standalone, val)
    v4 = t4.validate(standalone, val)
    v4_again = t4.validate(standalone, val)
    eval_compiles = sum("_eval" in n for n in COMPILES[before:])
    odd = ArrayLoader((x[:43],), 10)  # 10, 10, 10, 10, 3: none divides by 4
    p1, p4 = t1.predict(m1, odd), t4.predict(m4, odd)
    return {
        "param_rel_diff": rel_diff(float_state(m4), float_state(m1)),
        "history_rel_diff": history_diff(h1, h4),
        "history": h4.history,
        "trace_count": t4.programs.trace_count,
        "train_compiles": compiles,
        "state_specs": sorted({str(x.sharding.spec) for x in leaves}),
        "state_on_mesh": all(x.sharding.mesh == MESH for x in leaves),
        "module_specs": sorted(
            {
                str(v.get_value().sharding.spec)
                for v in jax.tree.leaves(
                    nnx.state(m4), is_leaf=lambda v: isinstance(v, nnx.Variable)
                )
            }
        ),
        "batch_spec": str(batch.sharding.spec),
        "batch_devices": len(batch.sharding.device_set),
        "validate_rel_diff": rel_diff(v4, v1),
        "validate_repeat_equal": v4 == v4_again,
        "eval_compiles": eval_compiles,
        "predict_shape": list(p4.shape),
        "predict_rel_diff": rel_diff(p4, p1),
    }


def stacked() -> dict:
    """steps_per_execution=2 and grad_accum_steps=2: the batch axis behind two stacking axes,
    and a short last group (6 batches of 8: 3 optimizer steps, calls of 2 + 1)."""
    x, y = toy_data(48)
    train = ArrayLoader((x, y), 8)
    make = lambda: Classifier(dropout=0.1, opt="adam", lr=1e-2)  # noqa: E731
    (m1, _, h1, _), (m4, t4, h4, compiles) = fit_pair(
        make, train, None, max_epochs=2, steps_per_execution=2, grad_accum_steps=2
    )
    return {
        "param_rel_diff": rel_diff(float_state(m4), float_state(m1)),
        "history_rel_diff": history_diff(h1, h4),
        "train_compiles": compiles,
        "global_step": t4.global_step,
    }


class FSDPNet(nnxfit.TrainModule):
    """Kernels sharded over 'data' when ``annotate``; the same numbers either way."""

    def __init__(self, annotate: bool):
        rngs = nnx.Rngs(0)
        init = nnx.initializers.lecun_normal()

        def kernel(spec):
            return nnx.with_partitioning(init, spec) if annotate else init

        self.l1 = nnx.Linear(8, 64, kernel_init=kernel((None, "data")), rngs=rngs)
        self.l2 = nnx.Linear(64, 32, kernel_init=kernel(("data", None)), rngs=rngs)
        self.l3 = nnx.Linear(32, 3, rngs=rngs)

    def __call__(self, x):
        return self.l3(nnx.relu(self.l2(nnx.relu(self.l1(x)))))

    def training_step(self, batch):
        x, y = batch
        return optax.softmax_cross_entropy_with_integer_labels(self(x), y).mean()

    def validation_step(self, batch):
        x, y = batch
        return {"loss": optax.softmax_cross_entropy_with_integer_labels(self(x), y).mean()}

    def configure_optimizers(self):
        return optax.adamw(1e-2)


def device_bytes(tree, device) -> int:
    return sum(
        s.data.nbytes
        for x in jax.tree.leaves(tree)
        for s in x.addressable_shards
        if s.device == device
    )


class HostEdit(nnxfit.Callback):
    """Assigns host (numpy) values to two variables after each epoch, as a user callback
    might: the Trainer must put them back with their annotated sharding."""

    def on_train_epoch_end(self, trainer, module, epoch, logs):
        for var in (module.l1.kernel, module.l3.bias):
            var.set_value(np.asarray(var.get_value()) * 0.5)


def fsdp() -> dict:
    x, y = toy_data(64)
    data = ArrayLoader((x, y), 16, shuffle=True)
    m1 = FSDPNet(annotate=False)
    h1 = nnxfit.Trainer(max_epochs=2, progress_bar=False, callbacks=[HostEdit()]).fit(
        m1, data, val_data=data
    )
    # Created unsharded (annotations only), so the Trainer does the placing; under
    # jax.set_mesh(...) with eager sharding they would be created sharded already.
    with nnx.use_eager_sharding(False):
        m4 = FSDPNet(annotate=True)
    created_on = len(m4.l1.kernel.get_value().sharding.device_set)
    trainer = nnxfit.Trainer(
        max_epochs=2, mesh=AUTO_MESH, progress_bar=False, callbacks=[HostEdit()]
    )
    h4 = trainer.fit(m4, data, val_data=data)
    state = trainer.train_state()
    dev = jax.devices()[0]
    params, opt = state["params"], state["opt"]
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    mu = opt[0].mu  # adamw = chain(scale_by_adam, add_decayed_weights, scale_by_lr)
    return {
        "param_rel_diff": rel_diff(float_state(m4), float_state(m1)),
        "history_rel_diff": history_diff(h1, h4),
        "param_bytes_total": total,
        "param_bytes_device0": device_bytes(params, dev),
        "opt_bytes_total": sum(x.nbytes for x in jax.tree.leaves(opt)),
        "opt_bytes_device0": device_bytes(opt, dev),
        "kernel_specs": {
            k: str(m4_var.get_value().sharding.spec)
            for k, m4_var in (("l1", m4.l1.kernel), ("l2", m4.l2.kernel), ("l3", m4.l3.kernel))
        },
        "mu_specs": {k: str(mu[k]["kernel"].sharding.spec) for k in ("l1", "l2", "l3")},
        "trace_count": trainer.programs.trace_count,
        "created_on_devices": created_on,
    }


class StartShardings(nnxfit.Callback):
    """Records the state's shardings when the first epoch of this run starts (after a resume
    has loaded the checkpoint, before any step could re-place anything)."""

    def on_train_epoch_start(self, trainer, module, epoch):
        if not hasattr(self, "devices"):
            state = trainer.train_state()
            self.devices = sorted({len(x.sharding.device_set) for x in jax.tree.leaves(state)})
            p = state["params"]
            self.specs = {k: str(p[k]["kernel"].sharding.spec) for k in ("l1", "l2", "l3")}
            self.mu_specs = {
                k: str(state["opt"][0].mu[k]["kernel"].sharding.spec) for k in ("l1", "l2")
            }


def checkpoint() -> dict:
    """FSDP state saved from 4 devices, resumed on 2: restored onto the live shardings, and
    the run ends where an uninterrupted one does."""
    try:
        from nnxfit.callbacks import ModelCheckpoint
    except ImportError:
        try:
            from nnxfit.callbacks.checkpoint import ModelCheckpoint
        except ImportError as e:
            return {"skipped": f"ModelCheckpoint is not available yet ({e})"}
    import tempfile

    x, y = toy_data(64)
    data = ArrayLoader((x, y), 16, shuffle=True)
    mesh2 = jax.make_mesh(
        (2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:2]
    )

    def fresh():
        with nnx.use_eager_sharding(False):
            return FSDPNet(annotate=True)

    ref = fresh()
    nnxfit.Trainer(max_epochs=2, mesh=AUTO_MESH, progress_bar=False).fit(ref, data)
    workdir = tempfile.mkdtemp()
    first = fresh()
    nnxfit.Trainer(
        max_epochs=1,
        mesh=AUTO_MESH,
        workdir=workdir,
        progress_bar=False,
        callbacks=[ModelCheckpoint()],
    ).fit(first, data)
    start = StartShardings()
    resumed = fresh()
    trainer = nnxfit.Trainer(
        max_epochs=2,
        mesh=mesh2,
        workdir=workdir,
        progress_bar=False,
        callbacks=[ModelCheckpoint(), start],
    )
    trainer.fit(resumed, data, resume=True)
    return {
        "param_rel_diff": rel_diff(float_state(resumed), float_state(ref)),
        "epochs": list(trainer.history.epoch),
        "restored_devices": start.devices,
        "restored_specs": start.specs,
        "restored_mu_specs": start.mu_specs,
        "final_devices": len(resumed.l1.kernel.get_value().sharding.device_set),
        "trace_count": trainer.programs.trace_count,
    }


def errors() -> dict:
    """Messages of the errors a mesh adds (no fit runs to completion here)."""
    x, y = toy_data(48)
    out = {}

    def catch(key, fn):
        try:
            fn()
            out[key] = None
        except Exception as e:  # noqa: BLE001 - the message is the result
            out[key] = f"{type(e).__name__}: {e}"

    trainer = nnxfit.Trainer(max_epochs=1, mesh=MESH, progress_bar=False)
    catch("train_batch_6", lambda: trainer.fit(Classifier(), ArrayLoader((x, y), 6)))
    catch("short_batch", lambda: trainer.placement.put_batch([x[:10]], 0))
    catch("stacked_short", lambda: trainer.placement.put_batch([x[:20].reshape(2, 10, 8)], 1))
    catch(
        "no_data_axis",
        lambda: nnxfit.Trainer(max_epochs=1, mesh=jax.make_mesh((4,), ("batch",))),
    )

    class Unknown(Classifier):
        def __init__(self):
            super().__init__()
            self.extra = nnx.Param(
                np.zeros((4, 4), np.float32), out_sharding=("model", None), eager_sharding=False
            )

    catch("unknown_axis", lambda: trainer.fit(Unknown(), ArrayLoader((x, y), 8)))
    return out


SCENARIOS = {f.__name__: f for f in (data_parallel, stacked, fsdp, checkpoint, errors)}

if __name__ == "__main__":
    results = {}
    for name in sys.argv[1:] or list(SCENARIOS):
        try:
            results[name] = SCENARIOS[name]()
        except Exception:  # noqa: BLE001 - reported to the test, which fails on it
            results[name] = {"error": traceback.format_exc()}
    print("RESULTS " + json.dumps(results))
