"""ModelSummary / summarize: counts, shapes, bytes and sharding a person can check by hand."""

import io
import os
import subprocess
import sys
import textwrap

import pytest
from flax import nnx
from models import Classifier, toy_data
from rich.console import Console

import nnxfit
from nnxfit.callbacks.summary import ModelSummary, summarize
from nnxfit.data import ArrayLoader
from nnxfit.errors import ConfigError

# The tiny MLP 8 -> 16 -> 3 of tests/models.py, by hand:
L1 = 8 * 16 + 16  # 144 params
L2 = 16 * 3 + 3  # 51
BN = 16 + 16  # scale, bias (trainable); mean, var are 16 + 16 BatchStat
RNG = 2  # Dropout's RngKey and RngCount, one element each


def render(table, width=120):
    c = Console(file=io.StringIO(), width=width)
    c.print(table)
    return c.file.getvalue()


def rows(text):
    """Table rows as lists of cells (the light box separates cells by 2+ spaces)."""
    return {
        cells[0]: cells
        for line in text.splitlines()
        if (cells := [c for c in line.strip().split("  ") if c.strip()])
    }


def cells(row):
    return [c.strip() for c in row]


def test_counts_by_submodule_and_totals():
    m = Classifier(batchnorm=True, dropout=0.1)
    r = {k: cells(v) for k, v in rows(render(summarize(m, max_depth=2))).items()}
    assert r["net"][:4] == ["net", "MLP", f"{L1 + L2 + BN}", f"{BN + RNG}"]
    assert r["net.l1"] == ["net.l1", "Linear", "144", "0", "16, 8x16", "f32", "576 B"]
    assert r["net.l2"] == ["net.l2", "Linear", "51", "0", "3, 16x3", "f32", "204 B"]
    assert r["net.bn"][:6] == ["net.bn", "BatchNorm", "32", "32", "16, 16, 16, 16", "f32"]
    assert r["net.drop"][:5] == ["net.drop", "Dropout", "0", "2", "(), ()"]
    assert r["trainable"] == ["trainable", "Param", "227", "f32", f"{227 * 4} B"]
    assert r["frozen"] == ["frozen", "0", "0 B"]
    assert r["other state"][2] == f"{32 + RNG}"
    assert r["total"] == ["total", "227", "34", "1.0 KiB"]
    # Depth 1 shows the top-level submodule only; -1 goes down to single variables.
    shallow = rows(render(summarize(m)))
    assert "net" in shallow and "net.l1" not in shallow
    deep = {k: cells(v) for k, v in rows(render(summarize(m, max_depth=-1))).items()}
    assert deep["net.l1.kernel"] == ["net.l1.kernel", "Param", "128", "0", "8x16", "f32", "512 B"]
    assert deep["net.bn.mean"][:4] == ["net.bn.mean", "BatchStat", "0", "16"]


class HeadOnly(Classifier):
    trainable = nnx.All(nnx.Param, nnx.PathContains("l2"))  # fine-tune the head only


def test_frozen_params_follow_the_trainable_filter():
    r = {k: cells(v) for k, v in rows(render(summarize(HeadOnly(), max_depth=2))).items()}
    assert r["net.l1"][2:4] == ["0", "144"]
    assert r["net.l2"][2:4] == ["51", "0"]
    assert r["trainable"][2] == "51"
    assert r["frozen"][:3] == ["frozen", "Param", "144"]


def test_abstract_module_needs_no_memory():
    abstract = nnx.eval_shape(lambda: Classifier(dropout=0.1))
    r = {k: cells(v) for k, v in rows(render(summarize(abstract, max_depth=2))).items()}
    assert r["total"][1:3] == [f"{L1 + L2}", f"{RNG}"]
    assert r["net.l1"][-1] == "576 B"


def test_model_summary_prints_at_fit_start(monkeypatch):
    monkeypatch.setenv("TERM", "xterm-256color")
    con = Console(file=io.StringIO(), force_terminal=True, width=100)
    x, y = toy_data(32)
    trainer = nnxfit.Trainer(max_epochs=1, console=con, callbacks=[ModelSummary()])
    trainer.fit(Classifier(), ArrayLoader((x, y), 16))
    out = con.file.getvalue()
    assert "Classifier summary" in out and "Trainable" in out
    assert out.index("Classifier summary") < out.index("Epoch 1/1 - 2/2 steps")
    assert f"{L1 + L2:,}" in out


def test_piped_output_gets_the_whole_table():
    # Not a terminal (a pipe, a CI log): rich says 80 columns, which cut names to "n…" and
    # wrapped every number. The table comes out whole instead, at its own width.
    con = Console(file=io.StringIO())  # what rich gives stdout in a pipe
    assert not con.is_terminal and con.width == 80
    x, y = toy_data(32)
    trainer = nnxfit.Trainer(max_epochs=1, console=con, callbacks=[ModelSummary(max_depth=-1)])
    trainer.fit(Classifier(batchnorm=True, dropout=0.1), ArrayLoader((x, y), 16))
    out = con.file.getvalue()
    assert "\x1b" not in out and "\u2026" not in out, out  # no escape codes, nothing cut
    table = out[: out.index("Epoch 1/1")]
    assert max(len(line.rstrip()) for line in table.splitlines()) > 80
    r = {k: cells(v) for k, v in rows(table).items()}
    assert r["net.drop.rngs.count"] == [
        "net.drop.rngs.count",
        "RngCount",
        "0",
        "1",
        "()",
        "u32",
        "4 B",
    ]
    assert r["net.l1.kernel"] == ["net.l1.kernel", "Param", "128", "0", "8x16", "f32", "512 B"]
    assert r["total"] == ["total", "227", "34", "1.0 KiB"]


def test_sharded_arrays_show_per_device_bytes_and_spec():
    # Two host devices need their own process: jax fixes the device count at start-up.
    code = textwrap.dedent(
        """
        import io, jax
        from flax import nnx
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from rich.console import Console
        from nnxfit.callbacks.summary import summarize
        mesh = Mesh(jax.devices(), ("data",))
        m = nnx.Linear(8, 16, rngs=nnx.Rngs(0))
        m.kernel.set_raw_value(jax.device_put(m.kernel.get_raw_value(),
                                              NamedSharding(mesh, P(None, "data"))))
        m.bias.set_raw_value(jax.device_put(m.bias.get_raw_value(), NamedSharding(mesh, P())))
        c = Console(file=io.StringIO(), width=140)
        c.print(summarize(m, max_depth=-1))
        print(c.file.getvalue())
        """
    )
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    r = {k: cells(v) for k, v in rows(out.stdout).items()}
    assert r["Name"][-2:] == ["Per device", "Sharding"]
    assert r["kernel"][-3:] == ["512 B", "256 B", "(None, 'data')"]  # half of it per device
    assert r["bias"][-3:] == ["64 B", "64 B", "replicated x2"]


def test_bad_depth():
    with pytest.raises(ConfigError, match="max_depth"):
        ModelSummary(max_depth=-2)
    with pytest.raises(ConfigError, match="max_depth"):
        summarize(Classifier(), max_depth="all")
