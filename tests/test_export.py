"""``nnxfit.export_weights``: a trained module's state, loaded back by flax and orbax alone."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from models import Classifier, toy_data

import nnxfit
from nnxfit.callbacks import ModelCheckpoint
from nnxfit.data import ArrayLoader

X, Y = toy_data(64)

# The inference side: no nnxfit anywhere, the network's class written out again.
INFER = textwrap.dedent(
    """
    import sys

    import numpy as np
    import orbax.checkpoint as ocp
    from flax import nnx


    class MLP(nnx.Module):  # tests/models.py's, as an inference script would define it
        def __init__(self, din=8, dh=16, dout=3, *, rngs, dropout=0.0, batchnorm=False):
            self.l1 = nnx.Linear(din, dh, rngs=rngs)
            self.bn = nnx.BatchNorm(dh, rngs=rngs) if batchnorm else None
            self.drop = nnx.Dropout(dropout, rngs=rngs) if dropout else None
            self.l2 = nnx.Linear(dh, dout, rngs=rngs)

        def __call__(self, x):
            h = self.l1(x)
            if self.bn is not None:
                h = self.bn(h)
            h = nnx.relu(h)
            if self.drop is not None:
                h = self.drop(h)
            return self.l2(h)


    weights, inputs, out = sys.argv[1:]
    abstract = nnx.eval_shape(lambda: MLP(rngs=nnx.Rngs(0), dropout=0.5, batchnorm=True))
    graphdef, state = nnx.split(abstract)
    state = ocp.StandardCheckpointer().restore(weights, state)
    model = nnx.merge(graphdef, state)
    model.eval()
    np.save(out, np.asarray(model(np.load(inputs))))
    assert not any(m.startswith("nnxfit") for m in sys.modules), "nnxfit was imported"
    """
)


def test_best_checkpoint_exported_and_loaded_without_nnxfit(tmp_path):
    module = Classifier(seed=1, dropout=0.5, batchnorm=True)
    trainer = nnxfit.Trainer(
        max_epochs=3,
        progress_bar=False,
        workdir=str(tmp_path / "run"),
        callbacks=[ModelCheckpoint(monitor="val_loss", save_top_k=1)],
    )
    data = ArrayLoader((X, Y), batch_size=16)
    trainer.fit(module, data, val_data=data)
    info = nnxfit.load_checkpoint(module, tmp_path / "run", "best")
    path = nnxfit.export_weights(module.net, tmp_path / "weights")
    assert path == str(tmp_path / "weights") and info.step > 0
    want = np.asarray(module.net(X))  # eval mode, as after fit; eager, as the script runs
    np.testing.assert_allclose(want, trainer.predict(module, data), rtol=1e-5, atol=1e-6)
    np.save(tmp_path / "x.npy", X)
    script = tmp_path / "infer.py"
    script.write_text(INFER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nnxfit not importable
    proc = subprocess.run(
        [sys.executable, str(script), path, str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), want)

    with pytest.raises(nnxfit.CheckpointError, match="overwrite=True"):
        nnxfit.export_weights(module.net, path)
    nnxfit.export_weights(module.net, path, overwrite=True)
    with pytest.raises(TypeError, match="nnx.Module"):
        nnxfit.export_weights({"w": X}, tmp_path / "other")
