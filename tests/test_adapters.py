"""Other pipelines as fit data: torch DataLoader (zero-copy numpy) and grain (exact iterator
position in the loop state). Skipped only where the optional dependency is missing."""

import jax
import numpy as np
import pytest
from flax import nnx
from models import Classifier, SignalAt, toy_data

import nnxfit
from nnxfit.adapters import GrainLoader, converter_for, seed_torch_sampler, to_numpy


def params_of(m):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(m, nnx.Param))]


def fit_params(data, **kw):
    kw.setdefault("max_epochs", 2)
    m = Classifier()
    tr = nnxfit.Trainer(progress_bar=False, **kw)
    tr.fit(m, data)
    return tr, params_of(m)


def numpy_batches(n=64, bs=16):
    x, y = toy_data(n)
    return [(x[i : i + bs], y[i : i + bs]) for i in range(0, n, bs)]


def test_numpy_batches_need_no_conversion():
    assert converter_for(numpy_batches()[0]) is None
    assert converter_for({"x": jax.numpy.ones(3)}) is None


class ArrayLike:
    """Stands in for a tf EagerTensor: not numpy, but exposes ``__array__``."""

    def __init__(self, a):
        self.a = a

    def __array__(self, dtype=None, copy=None):
        return self.a


def test_array_likes_are_converted_and_train():
    data = [(ArrayLike(x), ArrayLike(y)) for x, y in numpy_batches()]
    convert = converter_for(data[0])
    assert isinstance(convert(data[0])[0], np.ndarray)
    tr, got = fit_params(data)
    _, want = fit_params(numpy_batches())
    assert tr.global_step == 8
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


# ================================================================================ torch ===
def test_torch_tensors_become_numpy_views():
    torch = pytest.importorskip("torch")
    t = torch.arange(6.0).reshape(2, 3)
    a = to_numpy(t)
    assert isinstance(a, np.ndarray) and a.dtype == np.float32
    t[0, 0] = 42.0  # same memory: no copy was made
    assert a[0, 0] == 42.0
    g = torch.ones(3, requires_grad=True) * 2
    assert to_numpy(g).tolist() == [2.0, 2.0, 2.0]
    b = torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
    ab = to_numpy(b)
    assert str(ab.dtype) == "bfloat16" and ab.astype(np.float32).tolist() == [1.5, -2.0]
    b[0] = 3.0
    assert float(ab[0]) == 3.0


def test_torch_dataloader_trains_exactly_like_numpy_batches():
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, TensorDataset

    x, y = toy_data(64)
    loader = DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=16)
    tr, got = fit_params(loader)
    assert tr.steps_per_epoch == 4 and tr.global_step == 8
    _, want = fit_params(numpy_batches())
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


def test_shuffled_torch_dataloader_resumes_exactly_after_sigterm(tmp_path):
    """DataLoader(shuffle=True) draws its order from torch's global RNG; nnxfit seeds the
    sampler from (Trainer seed, epoch), so a run preempted mid-epoch and resumed (here in the
    same process, with the global RNG moved on) sees the same batches and ends alike."""
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, TensorDataset

    from nnxfit.callbacks.checkpoint import ModelCheckpoint

    x, y = toy_data(80)

    def run(workdir, callbacks=(), resume=False, seed=0):
        loader = DataLoader(
            TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=16, shuffle=True
        )
        m = Classifier()
        tr = nnxfit.Trainer(
            max_epochs=3,
            workdir=workdir,
            seed=seed,
            progress_bar=False,
            callbacks=[ModelCheckpoint(every_n_steps=100), *callbacks],
        )
        tr.fit(m, loader, resume=resume)
        return tr, params_of(m)

    _, want = run(tmp_path / "straight")
    with pytest.raises(nnxfit.TrainingInterrupted):
        run(tmp_path / "preempted", [SignalAt(7)])
    torch.rand(5)  # the global RNG moves on, as in a new process
    tr, got = run(tmp_path / "preempted", resume=True)
    assert tr.global_step == 15
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    # Still a shuffle: each epoch its own order, and another seed another order.
    loader = DataLoader(TensorDataset(torch.from_numpy(x)), batch_size=16, shuffle=True)
    orders = {}
    for seed, epoch in [(0, 0), (0, 1), (1, 0), (0, 0)]:
        seed_torch_sampler(loader, seed, epoch)
        orders.setdefault((seed, epoch), []).append(list(loader.sampler))
    assert orders[0, 0][0] == orders[0, 0][1] != orders[0, 1][0] != orders[1, 0][0]
    assert sorted(orders[0, 1][0]) == list(range(80))


def test_a_distributed_sampler_gets_each_epoch():
    """torch leaves DistributedSampler.set_epoch to the training loop; without it every
    epoch repeats one order."""
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    x, y = toy_data(64)
    ds = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0)
    loader = DataLoader(ds, batch_size=16, sampler=sampler)
    seen = Seen()
    nnxfit.Trainer(max_epochs=3, progress_bar=False, callbacks=[seen]).fit(Classifier(), loader)
    assert seen.epochs == [0, 1, 2]


class Seen(nnxfit.Callback):
    def __init__(self):
        self.epochs = []

    def on_train_epoch_end(self, trainer, module, epoch, logs):
        self.epochs.append(trainer.train_data.sampler.epoch)


def test_torch_dict_dataset_and_validation():
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, Dataset

    x, y = toy_data(48)

    class Dicts(Dataset):
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return {"image": torch.from_numpy(x[i]), "label": int(y[i])}

    class DictClassifier(Classifier):
        def training_step(self, batch):
            return super().training_step((batch["image"], batch["label"]))

        def validation_step(self, batch):
            return super().validation_step((batch["image"], batch["label"]))

        def predict_step(self, batch):
            return self(batch["image"])

    loader = DataLoader(Dicts(), batch_size=16, shuffle=True)
    tr = nnxfit.Trainer(max_epochs=2, progress_bar=False)
    h = tr.fit(DictClassifier(), loader, val_data=DataLoader(Dicts(), batch_size=32))
    assert np.isfinite(h.history["val_loss"]).all() and tr.global_step == 6
    preds = tr.predict(DictClassifier(), DataLoader(Dicts(), batch_size=32))
    assert preds.shape == (48, 3)


# ================================================================================ grain ===
def grain_dataloader(n=80, bs=8, endless=True, seed=0):
    grain = pytest.importorskip("grain")
    x, y = toy_data(n)
    records = [(x[i], y[i]) for i in range(n)]
    sampler = grain.samplers.IndexSampler(
        num_records=n,
        shard_options=grain.sharding.NoSharding(),
        shuffle=True,
        num_epochs=None if endless else 1,
        seed=seed,
    )
    return grain.DataLoader(
        data_source=records,
        sampler=sampler,
        operations=[grain.transforms.Batch(bs, drop_remainder=True)],
        worker_count=0,
    )


def labels(batches):
    return [b[1].tolist() for b in batches]


def test_grain_map_dataset_finite_pass_trains_like_the_same_batches():
    grain = pytest.importorskip("grain")
    x, y = toy_data(64)
    ds = grain.MapDataset.source([(x[i], y[i]) for i in range(64)]).batch(16)
    loader = GrainLoader(ds)
    assert len(loader) == 4
    tr, got = fit_params(loader, max_epochs=3)
    assert tr.global_step == 12
    _, want = fit_params(numpy_batches(), max_epochs=3)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_grain_endless_source_needs_batches_per_epoch():
    with pytest.raises(nnxfit.ConfigError, match="batches_per_epoch"):
        GrainLoader(grain_dataloader())
    grain = pytest.importorskip("grain")
    with pytest.raises(nnxfit.ConfigError, match="batches_per_epoch"):
        GrainLoader(grain.MapDataset.source(list(range(8))).repeat().batch(2))


def test_grain_state_at_restores_the_exact_position_even_after_read_ahead():
    ref = GrainLoader(grain_dataloader(), batches_per_epoch=5)
    want = [labels(ref.iter_epoch(e)) for e in range(3)]
    assert want[0] != want[1]  # one endless iterator: grain reshuffles between passes

    a = GrainLoader(grain_dataloader(), batches_per_epoch=5)
    list(a.iter_epoch(0))
    it = a.iter_epoch(1)
    [next(it) for _ in range(4)]  # read ahead of what was trained (prefetch, short batch)
    saved = a.state_at(1, 2)
    assert saved["epoch"] == 1 and saved["batch"] == 2 and isinstance(saved["iterator"], str)

    b = GrainLoader(grain_dataloader(), batches_per_epoch=5)
    b.load_state_dict(saved)
    assert labels(b.iter_epoch(1, 2)) == want[1][2:]
    assert labels(b.iter_epoch(2)) == want[2]

    c = GrainLoader(grain_dataloader(), batches_per_epoch=5)
    c.load_state_dict(a.state_at(1, 0))  # saved at an epoch boundary, resumed at the next
    assert labels(c.iter_epoch(1, 0)) == want[1]
    end = GrainLoader(grain_dataloader(), batches_per_epoch=5)
    end.load_state_dict(ref.state_at(1, 5))  # "epoch 1 done" resumes as "epoch 2 starts"
    assert labels(end.iter_epoch(2, 0)) == want[2]


def test_grain_finite_dataloader_new_pass_each_epoch_and_validation_restarts():
    loader = GrainLoader(grain_dataloader(n=40, endless=False))
    first = labels(loader.iter_epoch(0))
    assert len(first) == 5
    assert labels(loader.iter_epoch(1)) == first  # num_epochs=1: each pass is the same order
    saved = loader.state_at(1, 5)
    again = GrainLoader(grain_dataloader(n=40, endless=False))
    again.load_state_dict(saved)
    assert labels(again.iter_epoch(1, 5)) == []  # that pass had ended
    assert labels(again.iter_epoch(2)) == first
    assert loader.state_at(7, 0) == {"epoch": 7, "batch": 0, "iterator": None}


def test_trainer_checkpoints_the_grain_position_it_trained_not_the_prefetched_one():
    class Snap(nnxfit.Callback):
        def on_train_batch_end(self, trainer, module, step, logs):
            if step == 7:
                self.state = trainer.loop_state()
                trainer.should_stop = True

    snap = Snap()
    tr = nnxfit.Trainer(max_epochs=5, prefetch=3, callbacks=[snap], progress_bar=False)
    tr.fit(Classifier(), GrainLoader(grain_dataloader(), batches_per_epoch=5))
    st = snap.state
    assert (st["epoch"], st["batch_in_epoch"]) == (1, 2)
    assert (st["loader"]["epoch"], st["loader"]["batch"]) == (1, 2)

    ref = GrainLoader(grain_dataloader(), batches_per_epoch=5)
    want = [labels(ref.iter_epoch(e)) for e in range(2)]
    resumed = GrainLoader(grain_dataloader(), batches_per_epoch=5)
    resumed.load_state_dict(st["loader"])
    assert labels(resumed.iter_epoch(1, 2)) == want[1][2:]


def test_grain_resume_after_sigterm_is_exact(tmp_path):
    """Preempted mid-epoch and resumed through a real checkpoint, a fit on an endless,
    reshuffling grain loader ends with the same parameters as an uninterrupted one."""
    from nnxfit.callbacks.checkpoint import ModelCheckpoint

    def run(workdir, callbacks=(), resume=False):
        m = Classifier()
        tr = nnxfit.Trainer(
            max_epochs=3,
            workdir=workdir,
            progress_bar=False,
            callbacks=[ModelCheckpoint(every_n_steps=100), *callbacks],
        )
        tr.fit(m, GrainLoader(grain_dataloader(), batches_per_epoch=5), resume=resume)
        return tr, params_of(m)

    _, want = run(tmp_path / "straight")
    with pytest.raises(nnxfit.TrainingInterrupted):
        run(tmp_path / "preempted", [SignalAt(7)])
    tr, got = run(tmp_path / "preempted", resume=True)
    assert tr.global_step == 15
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
