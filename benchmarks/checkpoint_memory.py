"""Host memory a fit keeps per checkpoint save: does it level off?

Each contender runs one fit in its own fresh subprocess: the digits MLP (hidden 64, AdamW;
``--layers`` extra hidden layers add arrays), ``--steps`` steps, ``ModelCheckpoint(
every_n_steps=--every, save_top_k=1)``. A callback samples the RSS every ``--sample`` saves,
after ``gc.collect()`` and glibc's ``malloc_trim(0)`` (so freed but cached heap does not
count); the growth per save is the slope between the second sample and the last (the first
saves compile and warm caches). Contenders:

* ``no checkpoints``: the same fit without ModelCheckpoint (the floor);
* ``orbax as is``: nnxfit without its workarounds (``nnxfit.orbax_leaks.uninstall``): orbax
  calls ``tensorstore.KvStore.Spec(...).to_json()`` per array and
  ``tensorstore.experimental_collect_matching_metrics`` per item, both leaking what they
  return (TensorStore 0.1.86);
* ``nnxfit``: as shipped.

The growth per save is a least-squares slope over every sample after the first (RSS moves in
steps of pages and allocator arenas: two samples alone are noisy).

Exits 1 when nnxfit keeps more than ``--max-kb`` KB per save (default 20).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CONTENDERS = ("no checkpoints", "orbax as is", "nnxfit")


def child(args) -> dict:
    import ctypes
    import gc
    import shutil
    import tempfile

    sys.path.insert(0, HERE)
    import optax
    from common import MLP, digits, full_batches, loss_fn
    from flax import nnx

    import nnxfit
    from nnxfit.callbacks.checkpoint import ModelCheckpoint

    libc = ctypes.CDLL("libc.so.6")

    def rss_kb() -> int:
        gc.collect()
        libc.malloc_trim(0)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    class Deep(nnxfit.TrainModule):
        def __init__(self):
            rngs = nnx.Rngs(0)
            self.net = MLP(64, 64, 10, rngs=rngs)
            self.extra = nnx.List([nnx.Linear(64, 64, rngs=rngs) for _ in range(args.layers)])

        def training_step(self, batch):
            x, y = batch
            for layer in self.extra:  # digits: 64 features in
                x = nnx.relu(layer(x))
            return loss_fn(self.net, x, y)[0]

        def configure_optimizers(self):
            return optax.adamw(1e-3)

    samples: list[tuple[int, int]] = []

    class Sampler(nnxfit.Callback):
        order = 60

        def on_train_batch_end(self, trainer, module, step, logs):
            if step % (args.every * args.sample) == 0:
                samples.append((step // args.every, rss_kb()))

    callbacks: list = [Sampler()]
    if args.contender != "no checkpoints":
        callbacks.append(ModelCheckpoint(every_n_steps=args.every, save_top_k=1))
    if args.contender == "orbax as is":
        import nnxfit.checkpoint as ck
        from nnxfit import orbax_leaks

        ck._ocp()  # nnxfit's workarounds are installed on first use: undo them after
        orbax_leaks.uninstall()

    x, y = digits()
    x, y, batches = full_batches(x, y, 64)
    workdir = tempfile.mkdtemp(prefix="ckpt_memory_")
    try:
        trainer = nnxfit.Trainer(
            max_steps=args.steps,
            workdir=workdir,
            progress_bar=False,
            log_every_n_steps=1000,
            callbacks=callbacks,
        )
        trainer.fit(Deep(), nnxfit.data.ArrayLoader((x, y), 64, shuffle=True, seed=0))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    import numpy as np

    saves, rss = np.array(samples[1:], dtype=float).T
    return {"kb_per_save": float(np.polyfit(saves, rss, 1)[0]), "samples": samples}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--every", type=int, default=5, help="save every this many steps")
    p.add_argument("--sample", type=int, default=40, help="sample RSS every this many saves")
    p.add_argument("--layers", type=int, default=0, help="extra 64x64 layers (more arrays)")
    p.add_argument("--max-kb", type=float, default=20.0)
    p.add_argument("--contender", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.contender:
        print(json.dumps(child(args)))
        return 0

    n_saves = args.steps // args.every
    print(
        f"{n_saves} saves (every {args.every} of {args.steps} steps), MLP + {args.layers} extra "
        "layers, RSS after gc + malloc_trim, each contender in a fresh process",
        flush=True,
    )
    results = {}
    for name in CONTENDERS:
        cmd = [sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:])]
        cmd += ["--contender", name]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(out.stderr[-3000:])
            return 2
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        first, last = results[name]["samples"][1], results[name]["samples"][-1]
        print(
            f"  {name:20s} {results[name]['kb_per_save']:7.1f} KB per save "
            f"(RSS {first[1] / 1024:.0f} -> {last[1] / 1024:.0f} MiB, saves {first[0]}-{last[0]})",
            flush=True,
        )
    kept = results["nnxfit"]["kb_per_save"] - results["no checkpoints"]["kb_per_save"]
    ok = kept <= args.max_kb
    print(
        f"nnxfit keeps {kept:.1f} KB per save over no checkpoints (target <= {args.max_kb:.0f}) "
        f"{'ok' if ok else 'MISSED'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
