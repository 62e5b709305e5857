"""The validation sanity check: ``validation_step`` on the first few validation batches, before
the first training step (Lightning's ``num_sanity_val_steps``).

Without it, a bug in ``validation_step`` or validation data that yields nothing surfaces only
after a whole training epoch. The check runs the fit's own eval program (the one the epoch-end
validation runs, so its compilation is reused, not repeated) on the first
``Trainer(num_sanity_val_steps=2)`` batches and throws the numbers away: no hook runs, nothing
reaches ``History`` or the loggers, and the training state is only read, so a fit (and a
resumed one) ends bit for bit as without it. ``num_sanity_val_steps=0`` turns it off; ``-1``
checks every validation batch.
"""

from __future__ import annotations

from nnxfit.config import sanity_steps  # noqa: F401 (the option's check lives with the others)
from nnxfit.data import epoch_batches
from nnxfit.errors import EmptyDataError


def check_validation(trainer, run_validation) -> None:
    """Runs ``validation_step`` on the first ``trainer.num_sanity_val_steps`` batches of
    ``trainer.val_data`` with ``run_validation(batches)`` (the fit's eval program on its
    state); raises what it raises, with a note saying where it came from."""
    n = trainer.num_sanity_val_steps
    if not n or trainer.val_data is None or trainer.fast_dev_run:
        return
    limit = None if n == -1 else n
    if trainer.limit_val_batches is not None:
        limit = (
            trainer.limit_val_batches if limit is None else min(limit, trainer.limit_val_batches)
        )
    note = (
        f"(raised by the validation sanity check, which runs validation_step on "
        f"{'every' if limit is None else f'the first {limit}'} validation batch(es) before "
        "training; Trainer(num_sanity_val_steps=0) turns it off)"
    )
    try:
        batches = list(epoch_batches(trainer.val_data, 0, limit=limit))
        if not batches:
            raise EmptyDataError(
                f"val_data ({type(trainer.val_data).__name__}) yielded no batch; pass a "
                "non-empty loader, or leave val_data out."
            )
        run_validation(batches)
    except Exception as e:
        e.add_note(note)
        raise
