"""Where training metrics go: a JSON-lines file always; TensorBoard event files by default;
Weights & Biases / MLflow when enabled and installed. Only rank 0 logs."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from dqo_ray.config import RunConfig
from dqo_ray.io import append_jsonl

log = logging.getLogger(__name__)


class MetricsLogger:
    def __init__(self, run_dir: str | Path, cfg: RunConfig, config: dict[str, Any]) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.run_dir / "train_metrics.jsonl"
        self.tb = self.wandb = self.mlflow = None
        if cfg.tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        if cfg.wandb:
            try:
                import wandb

                self.wandb = wandb.init(project="dqo-ray", name=cfg.name, config=config,
                                        dir=str(self.run_dir))
            except ImportError:
                log.warning("run.wandb is on but wandb is not installed; skipping it")
        if cfg.mlflow:
            try:
                import mlflow

                mlflow.start_run(run_name=cfg.name)
                mlflow.log_params({k: str(v)[:250] for k, v in _flatten(config).items()})
                self.mlflow = mlflow
            except ImportError:
                log.warning("run.mlflow is on but mlflow is not installed; skipping it")

    def log(self, metrics: dict[str, float], step: int) -> None:
        append_jsonl(self.jsonl, {**metrics, "time": time.time()})
        numeric = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for key, value in numeric.items():
                self.tb.add_scalar(f"train/{key}", value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(numeric, step=step)
        if self.mlflow is not None:
            self.mlflow.log_metrics(numeric, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.mlflow is not None:
            self.mlflow.end_run()


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
