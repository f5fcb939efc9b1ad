"""Metrics of a run: one JSON object per logged step in `metrics.jsonl`, and console lines."""
from __future__ import annotations

import json
import os


class MetricsLog:
    """Appends records (`{"step": ..., "loss": ..., ...}`) to a JSON-lines file.

    Opening it for a run resumed at `resume_step` drops the records of later steps (written before
    the run was stopped, and about to be written again) and any line a kill cut short, so that each
    step appears once.
    """

    def __init__(self, path: str, resume_step: int = 0):
        self.path = path
        kept = [record for record in read_metrics(path) if record["step"] <= resume_step]
        temporary = f"{path}.tmp"
        with open(temporary, "w") as f:
            f.writelines(json.dumps(record) + "\n" for record in kept)
        os.replace(temporary, path)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics file (none if it doesn't exist), skipping a truncated last line."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def format_record(record: dict) -> str:
    """A console line: `step 12 | loss 3.2101 | grad_norm 0.981 | lr 2.91e-03 | tokens/s 15,234 | ...`."""
    parts = [f"step {record['step']}"]
    for name, value in record.items():
        if name == "step":
            continue
        if name == "lr":
            parts.append(f"lr {value:.2e}")
        elif name == "tokens_per_s":
            parts.append(f"tokens/s {value:,.0f}")
        else:
            parts.append(f"{name} {value:.4g}")
    return " | ".join(parts)
