"""A Hydra callback that ends every sweep with a table of its trials (overrides, monitored metric, run dir)
and the best one, printed and written to <sweep dir>/sweep_results.csv. Works for the basic (grid) sweeper
and the Optuna sweeper alike; no heavy imports."""

from __future__ import annotations

import csv
import logging
import math
import os
from typing import Any, Dict, List

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class SweepReport(Callback):
    def __init__(self) -> None:
        self.trials: List[Dict[str, Any]] = []

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        try:
            value = job_return.return_value
            status = "ok" if value is not None else "no metric"
        except Exception as err:  # a failed trial stays in the table with its error
            value, status = None, f"failed: {type(err).__name__}: {err}"
        self.trials.append({
            "trial": config.hydra.job.get("num", len(self.trials)),
            "overrides": " ".join(config.hydra.overrides.task),
            "value": value, "status": status, "dir": config.hydra.runtime.output_dir,
            "direction": _direction(config),
        })

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.trials:
            return
        metric = config.get("monitor") or "return value"
        maximize = self.trials[0]["direction"] != "minimize"
        scored = [t for t in self.trials if isinstance(t["value"], (int, float)) and not math.isnan(t["value"])]
        best = (max if maximize else min)(scored, key=lambda t: t["value"]) if scored else None
        lines = [f"sweep of {len(self.trials)} trials, {metric} ({'max' if maximize else 'min'}imized):",
                 f"{'trial':>5}  {metric:>12}  overrides"]
        for t in self.trials:
            shown = f"{t['value']:.4f}" if t in scored else t["status"]
            lines.append(f"{t['trial']:>5}  {shown:>12}  {t['overrides']}")
        if best:
            lines.append(f"best: trial {best['trial']} {metric}={best['value']:.4f}  {best['overrides']}  ({best['dir']})")
        report = "\n".join(lines)
        print(report)
        log.info(report)
        sweep_dir = config.hydra.sweep.dir
        os.makedirs(sweep_dir, exist_ok=True)
        with open(os.path.join(sweep_dir, "sweep_results.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["trial", "value", "status", "overrides", "dir"], extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.trials)


def _direction(config: DictConfig) -> str:
    direction = config.hydra.sweeper.get("direction", "maximize")
    return str(direction if isinstance(direction, str) else list(direction)[0])
