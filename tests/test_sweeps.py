"""Sweeps survive their trials: a trial that fails (here a bad hyperparameter) is recorded with its one-sentence
reason, the other trials run, and the sweep ends with its table (and, for Optuna, the failed trial told to the
study as failed, in a shared database)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from conftest import REPO, SMALL_SYNTHETIC
from test_gdino_train import TRAIN


def _run(*args, timeout=400):
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), "-m", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_a_grid_sweep_with_a_failing_trial_runs_the_rest_and_ends_with_its_table(tmp_path):
    sweep = tmp_path / "sweep"
    proc = _run("action=visualize", *SMALL_SYNTHETIC, "action.num_images=-1,1", f"hydra.sweep.dir={sweep}")
    rows = list(csv.DictReader(open(sweep / "sweep_results.csv")))
    assert [r["status"] for r in rows] == ["failed: config error: invalid config: action.num_images=-1 must be >= 0.",
                                           "no metric"]
    assert (sweep / "1" / "visualize").is_dir()  # the trial after the failed one ran
    assert "1 of 2 trials failed" in proc.stdout and "Traceback" not in proc.stderr
    assert (sweep / "0" / "trial_failed.json").exists()


@pytest.mark.slow
def test_optuna_sweep_marks_a_failed_trial_failed_in_its_shared_study(tmp_path):
    """sweep=gdino_optuna as shipped (TPE over the optimizer settings) plus a num_epochs choice whose 0 fails:
    each trial draws its own settings and has its own dir and resolved config, the study in its database holds
    the failed trial as FAIL and the other as COMPLETE, and the best trial is the one that trained."""
    import optuna

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    sweep = tmp_path / "sweep"
    proc = _run("sweep=gdino_optuna", *TRAIN[1:], "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.seed=0",
                "train.num_epochs=choice(0,1)", "hydra.sweeper.study_name=failing", f"hydra.sweeper.storage={storage}",
                f"hydra.sweep.dir={sweep}")
    study = optuna.load_study(study_name="failing", storage=storage)
    states = {t.params["train.num_epochs"]: t.state.name for t in study.trials}
    assert states == {0: "FAIL", 1: "COMPLETE"}, states
    rows = list(csv.DictReader(open(sweep / "sweep_results.csv")))
    assert {r["overrides"].count("train.optim.lr=") for r in rows} == {1}  # each trial drew its own lr
    failed, ok = sorted(rows, key=lambda r: r["status"] == "ok")
    assert failed["status"].startswith("failed: config error: invalid config: train.num_epochs=0 must be >= 1.")
    assert ok["status"] == "ok" and 0.0 <= float(ok["value"]) <= 1.0
    assert os.path.isfile(os.path.join(ok["dir"], "resolved_config.yaml"))
    assert f"best: trial {ok['trial']}" in proc.stdout and (sweep / "optimization_results.yaml").exists()
