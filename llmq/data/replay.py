"""The replay buffer of online training: every sample a run has drawn, up to a bound, for off-policy updates.

Rows are training rows of one objective (tokenized trajectories for ShiQ and SFT, chosen/rejected
pairs for DPO) with their reference statistics already computed, each stamped with the round that
sampled it.  When the buffer is full the oldest rows leave first.  The buffer is saved with each
round's checkpoint (one JSON file, written whole and then renamed into place) and read back on
``--resume``, so a resumed run replays exactly what an uninterrupted one would.
"""

from __future__ import annotations

import json
import os
from collections import deque
from pathlib import Path

import numpy as np

from llmq.errors import UserError

ROUND_KEY = "round"


class ReplayBuffer:
    """At most ``capacity`` rows, oldest first; each row a dict with a ``round`` key (the round that sampled it)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise UserError(f"key 'buffer_capacity' must be at least 1, got {capacity}")
        self.capacity = capacity
        self.rows: deque[dict] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, rows: list[dict], round_index: int) -> None:
        """Append ``rows`` sampled in round ``round_index``; the oldest rows leave when the buffer is full."""
        self.rows.extend({**row, ROUND_KEY: round_index} for row in rows)

    def older_than(self, round_index: int) -> list[dict]:
        """The rows sampled before round ``round_index`` (by earlier policies)."""
        return [row for row in self.rows if row[ROUND_KEY] < round_index]

    def age(self, round_index: int) -> dict[str, float]:
        """How many rounds old the rows are at round ``round_index``: mean and max (0 for an empty buffer)."""
        ages = [round_index - row[ROUND_KEY] for row in self.rows] or [0]
        return {"mean": float(np.mean(ages)), "max": float(max(ages))}

    def save(self, path: str | Path) -> None:
        """Write the buffer to ``path`` whole (a temporary file renamed into place: never half a buffer)."""
        path = Path(path)
        partial = path.with_suffix(path.suffix + ".partial")
        partial.write_text(json.dumps({"capacity": self.capacity, "rows": list(self.rows)}))
        os.replace(partial, path)

    @classmethod
    def load(cls, path: str | Path, capacity: int) -> ReplayBuffer:
        """The buffer saved at ``path``; ``capacity`` must be the one it was saved with."""
        try:
            saved = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:
            raise UserError(f"replay buffer {path} cannot be read ({type(error).__name__}: {error})") from None
        if saved["capacity"] != capacity:
            raise UserError(f"replay buffer {path} was saved with capacity {saved['capacity']}, not {capacity}")
        buffer = cls(capacity)
        buffer.rows.extend(saved["rows"])
        return buffer


def mixed_batches(
    fresh: list[dict],
    replayed: list[dict],
    replay_fraction: float,
    steps: int,
    batch_size: int,
    rng: np.random.Generator,
) -> list[list[dict]]:
    """``steps`` batches of ``batch_size`` rows: ``round(replay_fraction · batch_size)`` of each drawn from
    ``replayed`` (rows of earlier policies), the rest from ``fresh`` (this round's).

    Within each source the rows are drawn in shuffled passes (every row once before any row twice).
    When one source is empty the other fills the whole batch (the first round has nothing to replay).
    """
    replayed_per_batch = round(replay_fraction * batch_size) if replayed else 0
    if not fresh:
        replayed_per_batch = batch_size
    counts = {"fresh": batch_size - replayed_per_batch, "replayed": replayed_per_batch}
    streams = {
        name: _shuffled_passes(len(source), counts[name] * steps, rng)
        for name, source in (("fresh", fresh), ("replayed", replayed))
    }
    batches = []
    for step in range(steps):
        batch = []
        for name, source in (("fresh", fresh), ("replayed", replayed)):
            count = counts[name]
            batch += [source[i] for i in streams[name][step * count : (step + 1) * count]]
        batches.append(batch)
    return batches


def _shuffled_passes(size: int, count: int, rng: np.random.Generator) -> list[int]:
    """``count`` indices below ``size``: a random permutation, then another, ... (empty when ``size`` is 0)."""
    if size == 0 or count == 0:
        return []
    passes = -(-count // size)
    return np.concatenate([rng.permutation(size) for _ in range(passes)])[:count].tolist()
