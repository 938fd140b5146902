"""Sweeps survive their trials: a trial that fails (here a bad hyperparameter) is recorded with its one-sentence
reason, the other trials run, and the sweep ends with its table (and, for Optuna, the failed trial told to the
study as failed, in a shared database)."""

from __future__ import annotations

import csv
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
def test_optuna_marks_a_failed_trial_failed_in_its_shared_study(tmp_path):
    import optuna

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    sweep = tmp_path / "sweep"
    proc = _run("experiment=quickstart", *TRAIN[1:], "hydra/sweeper=optuna", "hydra.sweeper.sampler.seed=0",
                "hydra.sweeper.max_failure_rate=1.0", "train.num_epochs=choice(0,1)", "hydra.sweeper.n_trials=2",
                "hydra.sweeper.study_name=failing", f"hydra.sweeper.storage={storage}", "monitor=val_mAP50",
                f"hydra.sweep.dir={sweep}")
    study = optuna.load_study(study_name="failing", storage=storage)
    states = {t.params["train.num_epochs"]: t.state.name for t in study.trials}
    assert states == {0: "FAIL", 1: "COMPLETE"}, states
    rows = {r["overrides"].split()[0]: r for r in csv.DictReader(open(sweep / "sweep_results.csv"))}
    assert rows["train.num_epochs=0"]["status"].startswith("failed: config error: invalid config: train.num_epochs=0")
    assert rows["train.num_epochs=1"]["status"] == "ok" and "best: trial" in proc.stdout
    assert (sweep / "optimization_results.yaml").exists()
