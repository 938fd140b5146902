"""A Hydra callback that ends every sweep with a table of its trials (overrides, monitored metric, run dir)
and the best one, printed and written to <sweep dir>/sweep_results.csv. Works for the basic (grid) sweeper
and the Optuna sweeper alike; no heavy imports.

A trial that fails (a bad hyperparameter, a NaN stop, out of memory) does not end the sweep: run.py records
its one-sentence reason in `<trial dir>/trial_failed.json` (`record_failed_trial`) and returns no value, which
the Optuna sweeper tells its study as a failed trial (a NaN would make it raise); the other trials go on and the
table lists the failed one with its reason.

Where the trials run in other processes (hydra/launcher=submitit_slurm or submitit_local: each job's callbacks run
in its own process), the table is read back from the trial dirs at the end: Hydra's `.hydra/overrides.yaml`, and
run.py's `trial_result.json` (`record_trial_result`) or `trial_failed.json`; a trial dir with neither is a job
that ended without a word (killed, out of memory, a SLURM time limit)."""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Dict, List, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from groundlab.io.remote_files import redact



FAILED_FILE = "trial_failed.json"
RESULT_FILE = "trial_result.json"


def record_failed_trial(trial_dir: str, reason: str) -> None:
    """Write `reason` (one sentence) to the trial's trial_failed.json."""
    os.makedirs(trial_dir, exist_ok=True)
    with open(os.path.join(trial_dir, FAILED_FILE), "w") as f:
        json.dump({"reason": reason}, f)


def record_trial_result(trial_dir: str, value: Optional[float]) -> None:
    """Write the trial's monitored value (None: the action gave no metric) to its trial_result.json."""
    os.makedirs(trial_dir, exist_ok=True)
    with open(os.path.join(trial_dir, RESULT_FILE), "w") as f:
        json.dump({"value": value}, f)


def failed_reason(trial_dir: str) -> Optional[str]:
    """The reason record_failed_trial wrote for this trial, or None."""
    path = os.path.join(trial_dir, FAILED_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return str(json.load(f).get("reason"))


class SweepReport(Callback):
    def __init__(self) -> None:
        self.trials: List[Dict[str, Any]] = []

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        reason = failed_reason(config.hydra.runtime.output_dir)
        try:
            value = job_return.return_value
            status = "ok" if value is not None else "no metric"
        except Exception as err:  # a failed trial stays in the table with its error
            value, status = None, f"failed: {type(err).__name__}: {err}"
        if reason is not None:
            value, status = None, f"failed: {reason}"
        self.trials.append({
            "trial": config.hydra.job.get("num", len(self.trials)),
            "overrides": redact(" ".join(config.hydra.overrides.task)),  # never a URI's credentials
            "value": value, "status": status, "dir": config.hydra.runtime.output_dir,
            "direction": _direction(config),
        })

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.trials:  # the jobs ran in other processes (a submitit launcher): read their dirs
            self.trials = trials_in(config.hydra.sweep.dir, _direction(config))
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
        failed = [t for t in self.trials if t["status"].startswith("failed")]
        if failed:
            lines.append(f"{len(failed)} of {len(self.trials)} trials failed (reasons above; their dirs keep their "
                         f"logs{'' if scored else '; no trial gave a value'})")
        report = "\n".join(lines)
        print(report)  # Hydra's own logger would print it to the console a second time
        sweep_dir = config.hydra.sweep.dir
        os.makedirs(sweep_dir, exist_ok=True)
        with open(os.path.join(sweep_dir, "sweep_results.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["trial", "value", "status", "overrides", "dir"], extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.trials)


def trials_in(sweep_dir: str, direction: str) -> List[Dict[str, Any]]:
    """The table's rows from the trial dirs `<sweep_dir>/<n>/` that Hydra wrote (.hydra/overrides.yaml), by n."""
    import yaml

    rows = []
    numbered = [d for d in os.listdir(sweep_dir) if d.isdigit()] if os.path.isdir(sweep_dir) else []
    for name in sorted(numbered, key=int):
        trial_dir = os.path.join(sweep_dir, name)
        overrides_file = os.path.join(trial_dir, ".hydra", "overrides.yaml")
        if not os.path.isfile(overrides_file):
            continue
        with open(overrides_file) as f:
            overrides = yaml.safe_load(f) or []
        reason, value, status = failed_reason(trial_dir), None, "no result: the job ended without one (killed?)"
        if reason is not None:
            status = f"failed: {reason}"
        elif os.path.isfile(os.path.join(trial_dir, RESULT_FILE)):
            with open(os.path.join(trial_dir, RESULT_FILE)) as f:
                value = json.load(f)["value"]
            status = "ok" if value is not None else "no metric"
        rows.append({"trial": int(name), "overrides": redact(" ".join(overrides)), "value": value, "status": status,
                     "dir": trial_dir, "direction": direction})
    return rows


def _direction(config: DictConfig) -> str:
    """"maximize" or "minimize": the Optuna sweeper's direction (a name, an enum, or a list of either; the first
    objective decides), maximize for sweepers without one."""
    direction = config.hydra.sweeper.get("direction", "maximize")
    if not isinstance(direction, str) and hasattr(direction, "__iter__"):
        direction = list(direction)[0]
    return str(getattr(direction, "name", direction))
