"""Sweeps survive their trials: a trial that fails (here a bad hyperparameter) is recorded with its one-sentence
reason, the other trials run, and the sweep ends with its table (and, for Optuna, the failed trial told to the
study as failed, in a shared database)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

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


def _states(storage_file) -> list:
    """The study's trial states, read straight from its sqlite file (cheap enough to poll)."""
    import sqlite3

    try:
        with sqlite3.connect(f"file:{storage_file}?mode=ro", uri=True, timeout=1) as db:
            return [row[0] for row in db.execute("SELECT state FROM trials ORDER BY trial_id")]
    except sqlite3.Error:  # not created yet, or being written
        return []


@pytest.mark.slow
def test_a_killed_optuna_sweep_resumes_its_study(tmp_path):
    """hydra.sweeper.n_trials is the shared study's total: a sweep killed in its second trial, given again, runs
    the interrupted trial's parameters again first, then the one trial still missing; the study ends with three
    complete trials and the interrupted one marked failed and `interrupted`."""
    import optuna

    db = tmp_path / "study.db"
    args = [sys.executable, str(REPO / "run.py"), "-m", "hydra/sweeper=groundlab_optuna", "action=visualize",
            *SMALL_SYNTHETIC, "dataset.synthetic.num_train=80", "action.num_images=choice(40,60,80)",
            "monitor=images", "hydra.sweeper.direction=maximize", "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=1",
            "hydra.sweeper.sampler.seed=0", "hydra.sweeper.study_name=resumed", f"hydra.sweeper.storage=sqlite:///{db}"]
    first = subprocess.Popen([*args, f"hydra.sweep.dir={tmp_path / 'first'}"], cwd=REPO, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (tmp_path / "first" / "1").is_dir():  # the second trial started (a trial renders for seconds)
        assert first.poll() is None and time.time() < deadline, f"the sweep ended first: {_states(db)}"
        time.sleep(0.02)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert _states(db) == ["COMPLETE", "RUNNING"]
    study = optuna.load_study(study_name="resumed", storage=f"sqlite:///{db}")
    interrupted = study.trials[1].params

    proc = _run(*args[3:], f"hydra.sweep.dir={tmp_path / 'first'}")  # the same command, the same sweep dir
    assert "1 of 3 trials finished, 1 interrupted (tried again first); running 2" in proc.stdout + proc.stderr
    trials = optuna.load_study(study_name="resumed", storage=f"sqlite:///{db}").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert trials[1].user_attrs["interrupted"] and trials[2].params == interrupted  # retried first
    rows = list(csv.DictReader(open(tmp_path / "first" / "sweep_results.csv")))
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    # numbered after the killed sweep's trial dirs (0, 1: the interrupted one keeps its dir)
    assert [r["dir"] for r in rows] == [str(tmp_path / "first" / n) for n in ("2", "3")]


@pytest.mark.slow
def test_a_sweep_on_submitits_local_executor_ends_with_its_table(tmp_path):
    """hydra/launcher=submitit_local runs each trial as a submitit job in its own process (as submitit_slurm does
    on a cluster), where the sweep's callbacks do not run: the table is read back from the trial dirs."""
    sweep = tmp_path / "sweep"
    proc = _run("hydra/launcher=submitit_local", "action=visualize", *SMALL_SYNTHETIC, "action.num_images=-1,2",
                "monitor=images", f"hydra.sweep.dir={sweep}")
    rows = list(csv.DictReader(open(sweep / "sweep_results.csv")))
    assert [r["status"] for r in rows] == ["failed: config error: invalid config: action.num_images=-1 must be >= 0.",
                                           "ok"]
    assert float(rows[1]["value"]) == 2.0 and "best: trial 1 images=2.0000" in proc.stdout
    # it ran as a submitit job, not in the sweep's process; each job has its submitit log
    assert json.loads((sweep / "1" / "run_info.json").read_text())["command"][1].endswith("submitit/core/_submit.py")
    assert len(list((sweep / ".submitit").glob("*/*_log.out"))) == 2


def test_the_slurm_launcher_is_sized_from_the_training_settings():
    from groundlab.config.compose import compose_config
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    compose_config([])  # registers the schemas
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True, overrides=[
            "hydra/launcher=groundlab_slurm", "action=train", "train.num_gpus=4", "train.num_nodes=2",
            "hydra.launcher.partition=gpu"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (cfg.hydra.launcher.nodes, cfg.hydra.launcher.tasks_per_node, cfg.hydra.launcher.gpus_per_node) == (2, 4, 4)
    assert cfg.hydra.launcher.partition == "gpu" and cfg.hydra.launcher.max_num_timeout == 3
