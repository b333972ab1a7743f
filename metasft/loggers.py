"""Metric sinks: a JSONL file, TensorBoard and wandb (the console view lives in the trainer).

Only rank 0 logs. ``metrics.jsonl`` in the run directory has one object per logged meta-step; on
resume, lines beyond the resumed step are dropped so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from metasft.errors import ConfigError

METRICS_FILE = "metrics.jsonl"


class MetricLogger:
    def __init__(self, sinks: list[str], run_dir: str | Path, project: str, experiment: str,
                 config: dict[str, Any], resume_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.jsonl = None
        self.tensorboard = None
        self.wandb = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if "jsonl" in sinks:
            path = run_dir / METRICS_FILE
            if path.exists():
                _truncate_after(path, resume_step)
            self.jsonl = open(path, "a", encoding="utf-8")
        if "tensorboard" in sinks:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ConfigError("trainer.logger: tensorboard needs `pip install 'metasft[tensorboard]'`") from exc
            self.tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if "wandb" in sinks:
            try:
                import wandb
            except ImportError as exc:
                raise ConfigError("trainer.logger: wandb needs `pip install 'metasft[wandb]'`") from exc
            self.wandb = wandb.init(project=project, name=experiment, config=config, resume="allow")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: v for k, v in metrics.items() if v is not None}
        if self.jsonl is not None:
            record = {"step": step, **{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                       for k, v in clean.items()}}
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        numeric = {k: v for k, v in clean.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tensorboard is not None:
            for key, value in numeric.items():
                self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(numeric, step=step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _truncate_after(path: Path, step: int) -> None:
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
