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

from dataclasses import dataclass
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from omegaconf import DictConfig


class GroundlabOptunaSweeper(Sweeper):
    """OptunaSweeper's interface (the same config keys) over ResumingSweeperImpl."""

    def __init__(self, sampler: Any, direction: Any, storage: Optional[Any], study_name: Optional[str],
                 n_trials: int, n_jobs: int, max_failure_rate: float, search_space: Optional[DictConfig],
                 custom_search_space: Optional[str], params: Optional[DictConfig]) -> None:
        from hydra_plugins.groundlab_optuna_sweeper._resuming_impl import ResumingSweeperImpl  # imports Optuna

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
