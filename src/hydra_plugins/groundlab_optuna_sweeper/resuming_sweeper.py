"""Hydra's Optuna sweeper (hydra-optuna-sweeper), with a study that resumes: `hydra/sweeper=groundlab_optuna`.

With a storage (`hydra.sweeper.storage=sqlite:///sweeps.db`, or a database several machines share),
`hydra.sweeper.n_trials` is the study's total, not the number of trials each command adds: a sweep that finds the
study with finished trials (complete, pruned or failed) runs only the rest, so an interrupted sweep's command,
given again, completes it. A trial the interrupted sweep left running (its process, on this machine, is gone) is
told to the study as failed, marked `interrupted`, and its parameters are tried again first. Trials running on
other machines are theirs: they are neither counted nor touched. Without a storage (an in-memory study) nothing
is resumed and n_trials is what this sweep runs, as in Hydra's sweeper.

Everything else (search space syntax, samplers, directions, failures up to max_failure_rate, the
optimization_results.yaml) is Hydra's sweeper, unchanged."""


import logging
import os
import socket
from dataclasses import dataclass
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from omegaconf import DictConfig

log = logging.getLogger(__name__)

PROCESS_ATTR = "groundlab_sweep_process"  # "<host>:<pid>" of the sweep that asked for the trial
INTERRUPTED_ATTR = "interrupted"


def _this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _gone(process: Optional[str]) -> bool:
    """Whether the sweep process "<host>:<pid>" ran on this machine and no longer runs."""
    host, _, pid = (process or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


class ResumingSweeperImpl(OptunaSweeperImpl):
    def sweep(self, arguments: List[str]) -> None:
        if self.storage is not None:
            self.n_trials = max(0, self.n_trials - self._resume())
        super().sweep(arguments)

    def _configure_trials(self, trials, search_space_distributions, fixed_params):  # noqa: ANN001
        for trial in trials:  # who asked: a resumed sweep tells this one's trials from another machine's
            trial.set_user_attr(PROCESS_ATTR, _this_process())
        return super()._configure_trials(trials, search_space_distributions, fixed_params)

    def _resume(self) -> int:
        """Tell the study's interrupted trials failed and queue their parameters again; return how many of its
        trials are finished (before that)."""
        import optuna

        try:
            study = optuna.load_study(study_name=self.study_name, storage=self.storage)
        except KeyError:  # a new study
            return 0
        states = optuna.trial.TrialState
        trials = study.get_trials(deepcopy=False)
        finished = sum(t.state in (states.COMPLETE, states.PRUNED, states.FAIL) for t in trials)
        interrupted = [t for t in trials if t.state == states.RUNNING and _gone(t.user_attrs.get(PROCESS_ATTR))]
        for trial in interrupted:
            study._storage.set_trial_user_attr(trial._trial_id, INTERRUPTED_ATTR, True)
            study.tell(trial.number, state=states.FAIL)
            study.enqueue_trial(trial.params)
        left = max(0, self.n_trials - finished)
        log.info(f"Study {study.study_name}: {finished} of {self.n_trials} trials finished, "
                 f"{len(interrupted)} interrupted (tried again first); running {left}")
        return finished


class GroundlabOptunaSweeper(Sweeper):
    """OptunaSweeper's interface (the same config keys) over ResumingSweeperImpl."""

    def __init__(self, sampler: Any, direction: Any, storage: Optional[Any], study_name: Optional[str],
                 n_trials: int, n_jobs: int, max_failure_rate: float, search_space: Optional[DictConfig],
                 custom_search_space: Optional[str], params: Optional[DictConfig]) -> None:
        self.sweeper = ResumingSweeperImpl(sampler, direction, storage, study_name, n_trials, n_jobs,
                                           max_failure_rate, search_space, custom_search_space, params)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> None:
        return self.sweeper.sweep(arguments)


@dataclass
class GroundlabOptunaSweeperConf(OptunaSweeperConf):
    _target_: str = "hydra_plugins.groundlab_optuna_sweeper.resuming_sweeper.GroundlabOptunaSweeper"


ConfigStore.instance().store(group="hydra/sweeper", name="groundlab_optuna", node=GroundlabOptunaSweeperConf,
                             provider="groundlab")
