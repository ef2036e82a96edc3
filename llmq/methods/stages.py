"""What every method's run shares: the stage ledger that makes ``--resume`` skip finished stages,
the before/after benchmark's paired change, and ``summary.json``.

A run is a sequence of named stages (a benchmark before, data, training, a benchmark after, ...).
:class:`StageLedger` records the run's settings (key ``settings``) and each finished stage's report
(keyed by the stage's name) in ``output_dir/stages.json``, rewritten after every stage; with ``resume`` a stage already
recorded
under the same settings is read back instead of run again, and a ledger of other settings is
refused, naming the keys that differ.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from llmq.errors import UserError
from llmq.stats import paired_difference

STAGES_FILE = "stages.json"
SUMMARY_FILE = "summary.json"


class StageLedger:
    """The settings of a run and the report of each stage it finished, kept in ``output_dir/stages.json``.

    Args:
        output_dir: the run's folder (created).
        settings: everything that makes two runs' stages interchangeable (model, seed, the method's
            keys), JSON-serialisable.
        resume: read an existing ledger back (its settings must equal ``settings``); without it a
            new ledger replaces any old one.
    """

    def __init__(self, output_dir: str | Path, settings: dict, resume: bool) -> None:
        self.path = Path(output_dir) / STAGES_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.settings = json.loads(json.dumps(settings, default=str))  # as the file will hold them
        self.stages: dict[str, dict] = {}
        if resume and self.path.is_file():
            recorded = json.loads(self.path.read_text())
            earlier = recorded.get("settings", {})
            if earlier != self.settings:
                differing = sorted(
                    key for key in self.settings.keys() | earlier.keys() if earlier.get(key) != self.settings.get(key)
                )
                raise UserError(
                    f"{self.path} is the record of a run with other settings ({', '.join(differing)}): "
                    "resume with the same recipe, or use a new output_dir"
                )
            self.stages = {stage: report for stage, report in recorded.items() if stage != "settings"}
            if self.stages:
                print(f"resuming after the stages {', '.join(self.stages)} of {self.path}", flush=True)

    def __contains__(self, stage: str) -> bool:
        return stage in self.stages

    def __getitem__(self, stage: str) -> dict:
        return self.stages[stage]

    def record(self, stage: str, report: dict) -> dict:
        """Record ``stage`` as finished with ``report`` (rewrites the ledger); returns the report."""
        self.stages[stage] = json.loads(json.dumps(report, default=str))
        self.path.write_text(json.dumps({"settings": self.settings, **self.stages}, indent=2) + "\n")
        return self.stages[stage]

    def run(self, stage: str, compute: Callable[[], dict]) -> dict:
        """The recorded report of ``stage``, or ``compute()``'s, recorded."""
        return self.stages[stage] if stage in self.stages else self.record(stage, compute())


def paired_change(before: Sequence[float], after: Sequence[float], metric: str, method: str, seed: int) -> dict:
    """The change of a per-question (per-game) ``metric`` from ``before`` to ``after`` on the same
    questions: its mean and a paired 95% interval (Newcombe's for 0/1 outcomes, else the bootstrap);
    printed as one line."""
    change = paired_difference(before, after, seed=seed)
    low, high = change["ci95_paired"]
    print(
        f"change after {method}, {metric}: {change['mean']:+.3f} (paired 95% CI {low:+.3f} to {high:+.3f})", flush=True
    )
    return change


def write_summary(output_dir: str | Path, summary: dict) -> dict:
    """Write ``output_dir/summary.json``; returns ``summary``."""
    path = Path(output_dir) / SUMMARY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary
