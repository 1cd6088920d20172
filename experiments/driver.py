"""What every training driver does last: train, evaluate, close, and leave the results as files."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

from common.metrics import plot_curves
from common.trainer import DataIterator, Evaluator, Trainer


def fit_and_report(trainer: Trainer, data: DataIterator, evaluators: Mapping[str, Evaluator], workdir: Path,
                   curves: Sequence[str] = ()) -> dict[str, Any]:
    """Trains (resuming from the workdir's last checkpoint) with `evaluators`, closes the data and the
    trainer, and on process 0 plots `curves` of metrics.jsonl to curves.png and writes summary.json."""
    try:
        result = trainer.fit(data, evaluators)
        summary = trainer.summary(result, data)
    finally:
        data.close()
        trainer.close()
    if jax.process_index() == 0:
        if result.history and curves:
            plot_curves(workdir / "metrics.jsonl", list(curves), workdir / "curves.png")
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary
