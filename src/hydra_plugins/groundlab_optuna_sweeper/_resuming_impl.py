"""The study behind `hydra/sweeper=groundlab_optuna` (resuming_sweeper.py says what it does): a sweep counts the
finished trials of its stored study and runs only the rest, and fails and retries the trials that a killed sweep
on this machine left running. A module of its own, which Hydra's plugin scan skips (leading underscore), so that
Optuna is imported only by a sweep that uses it."""

import logging
import os
import socket
from typing import List, Optional

from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl

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
            # a resumed sweep in the same sweep dir numbers its trials after the dirs there: trial n's dir holds
            # another trial's checkpoints, which training in it would resume from
            sweep_dir = str(self.config.hydra.sweep.dir)
            taken = [int(d) for d in os.listdir(sweep_dir) if d.isdigit()] if os.path.isdir(sweep_dir) else []
            self.job_idx = max([self.job_idx, *(n + 1 for n in taken)])
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
        # a trial an earlier resume found interrupted was queued again: its retry is the one that counts
        finished = sum(t.state in (states.COMPLETE, states.PRUNED, states.FAIL)
                       and not t.user_attrs.get(INTERRUPTED_ATTR) for t in trials)
        interrupted = [t for t in trials if t.state == states.RUNNING and _gone(t.user_attrs.get(PROCESS_ATTR))]
        for trial in interrupted:
            study._storage.set_trial_user_attr(trial._trial_id, INTERRUPTED_ATTR, True)
            study.tell(trial.number, state=states.FAIL)
            study.enqueue_trial(trial.params)
        left = max(0, self.n_trials - finished)
        log.info(f"Study {study.study_name}: {finished} of {self.n_trials} trials finished, "
                 f"{len(interrupted)} interrupted (tried again first); running {left}")
        return finished
