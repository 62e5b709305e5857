"""Bad input gets an nnxfit error naming the thing, the value and the fix."""

import numpy as np
import optax
import pytest
from models import Classifier, toy_data

import nnxfit
from nnxfit.data import ArrayLoader


def fit(data, **kw):
    kw.setdefault("max_epochs", 1)
    t = nnxfit.Trainer(progress_bar=False, **kw)
    return t.fit(Classifier(), data)


def test_missing_or_bad_limits():
    with pytest.raises(nnxfit.ConfigError, match="max_epochs or max_steps"):
        nnxfit.Trainer()
    with pytest.raises(ValueError, match=r"max_epochs must be an integer >= 1; got 0"):
        nnxfit.Trainer(max_epochs=0)
    with pytest.raises(ValueError, match=r"max_steps must be an integer >= 1; got -3"):
        nnxfit.Trainer(max_steps=-3)


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"steps_per_execution": 0}, r"steps_per_execution must be an integer >= 1; got 0"),
        ({"grad_accum_steps": 0}, r"grad_accum_steps must be an integer >= 1; got 0"),
        ({"precision": "fp16"}, r"precision must be one of \('float32', 'bfloat16'\); got 'fp16'"),
        ({"grad_clip_norm": -1.0}, r"grad_clip_norm must be a number > 0"),
        ({"log_every_n_steps": 0}, r"log_every_n_steps must be an integer >= 1"),
    ],
)
def test_options_out_of_range(kw, msg):
    with pytest.raises(nnxfit.ConfigError, match=msg):
        nnxfit.Trainer(max_epochs=1, **kw)


def test_workdir_that_is_a_file(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(nnxfit.ConfigError, match="exists and is a file"):
        nnxfit.Trainer(max_epochs=1, workdir=f)


def test_batch_with_other_trailing_shape_names_leaf_shapes_and_index():
    x, y = toy_data(64)
    batches = [(x[:16], y[:16]), (x[16:32], y[16:32]), (x[32:48, :6], y[32:48])]
    m = Classifier()
    with pytest.raises(nnxfit.BatchError) as e:
        nnxfit.Trainer(max_epochs=1, progress_bar=False).fit(m, batches)
    msg = str(e.value)
    assert "batch 2" in msg and "[0].shape (16, 6)" in msg and "(16, 8)" in msg
    assert "Only the leading (batch) dimension may change" in msg
    assert isinstance(e.value, ValueError)


def test_batch_with_other_dtype_or_structure():
    x, y = toy_data(32)
    with pytest.raises(
        nnxfit.BatchError, match=r"batch 1 has \[1\].dtype int64, earlier batches int32"
    ):
        fit([(x[:16], y[:16]), (x[16:], y[16:].astype(np.int64))])
    with pytest.raises(nnxfit.BatchError, match="batch 1 has structure"):
        fit([(x[:16], y[:16]), {"x": x[16:], "y": y[16:]}])


def test_empty_loaders():
    with pytest.raises(nnxfit.EmptyDataError, match="has no batches"):
        fit([])
    x, y = toy_data(10)
    with pytest.raises(nnxfit.EmptyDataError, match="drop_last=True"):
        ArrayLoader((x, y), 16, drop_last=True)
    with pytest.raises(nnxfit.EmptyDataError, match="0 examples"):
        ArrayLoader((x[:0], y[:0]), 4)
    with pytest.raises(nnxfit.EmptyDataError, match="validation data yielded no batch"):
        nnxfit.Trainer(max_epochs=1, progress_bar=False).validate(Classifier(), iter_empty())


class iter_empty:
    def __iter__(self):
        return iter(())


def test_one_shot_generator_is_explained():
    x, y = toy_data(32)
    gen = ((x[i : i + 16], y[i : i + 16]) for i in (0, 16))
    with pytest.raises(nnxfit.ConfigError, match="one-shot"):
        fit(gen)


def test_non_scalar_loss_and_bad_metrics():
    class VectorLoss(Classifier):
        def training_step(self, batch):
            x, y = batch
            return optax.softmax_cross_entropy_with_integer_labels(self.net(x), y)

    x, y = toy_data(32)
    with pytest.raises(nnxfit.StepOutputError, match=r"loss of shape \(16,\); it must be a scalar"):
        nnxfit.Trainer(max_epochs=1, progress_bar=False).fit(VectorLoss(), ArrayLoader((x, y), 16))

    class BadMetrics(Classifier):
        def training_step(self, batch):
            return super().training_step(batch)[0], [1.0]

    with pytest.raises(nnxfit.StepOutputError, match=r"the second a list.*\(loss, \{'metric'"):
        nnxfit.Trainer(max_epochs=1, progress_bar=False).fit(BadMetrics(), ArrayLoader((x, y), 16))


def test_not_a_train_module_and_bad_optimizer():
    with pytest.raises(TypeError, match="expected an nnxfit.TrainModule"):
        nnxfit.Trainer(max_epochs=1).fit(object(), [])

    class NoOpt(Classifier):
        def configure_optimizers(self):
            return 1e-3

    x, y = toy_data(16)
    with pytest.raises(TypeError, match="optax.GradientTransformation"):
        nnxfit.Trainer(max_epochs=1, progress_bar=False).fit(NoOpt(), [(x, y)])


def test_val_data_without_validation_step():
    class NoVal(nnxfit.TrainModule):
        def __init__(self):
            self.c = Classifier()

        def training_step(self, batch):
            return self.c.training_step(batch)

        def configure_optimizers(self):
            return optax.sgd(0.1)

    x, y = toy_data(16)
    with pytest.raises(nnxfit.ConfigError, match="defines no validation_step"):
        nnxfit.Trainer(max_epochs=1, progress_bar=False).fit(NoVal(), [(x, y)], val_data=[(x, y)])


def test_error_mid_epoch_keeps_progress():
    x, y = toy_data(64)
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 48, 16)] + [(x[:16, :4], y[:16])]
    m = Classifier()
    before = np.array(m.net.l1.kernel[...])
    t = nnxfit.Trainer(max_epochs=1, progress_bar=False)
    with pytest.raises(nnxfit.BatchError):
        t.fit(m, batches)
    assert t.global_step == 3
    assert not np.array_equal(np.asarray(m.net.l1.kernel[...]), before)
