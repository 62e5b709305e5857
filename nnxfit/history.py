"""Keras-style record of a fit: one value per epoch for every metric."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class History:
    """``history[name]`` lists one float per epoch; ``epoch`` the epoch indices run.

    A metric that appears only in some epochs (validation every 2 epochs, a callback that
    starts logging late) is padded with ``nan`` so every list lines up with ``epoch``.
    """

    history: dict[str, list[float]] = field(default_factory=dict)
    epoch: list[int] = field(default_factory=list)

    def append(self, epoch: int, logs: dict[str, float]) -> None:
        n = len(self.epoch)
        self.epoch.append(int(epoch))
        for name in logs:
            self.history.setdefault(name, [float("nan")] * n)
        for name, values in self.history.items():
            values.append(float(logs.get(name, float("nan"))))

    def state_dict(self) -> dict:
        return {"history": {k: list(v) for k, v in self.history.items()}, "epoch": list(self.epoch)}

    def load_state_dict(self, d: dict) -> None:
        self.history = {k: [float(x) for x in v] for k, v in d.get("history", {}).items()}
        self.epoch = [int(e) for e in d.get("epoch", [])]

    def __repr__(self) -> str:
        keys = ", ".join(self.history)
        return f"History(epochs={len(self.epoch)}, metrics=[{keys}])"
