"""groundlab's only entrypoint: `python run.py [experiment=...] [model=...] [action=...] [key=value ...]`.

Composes the typed config, checks it, and runs `RECIPES[(model, action)]` (src/groundlab/recipes.py). Returns
the metric named by `monitor` so Hydra sweepers (grid, Optuna) can optimize it. Heavy libraries (torch,
transformers, lightning) are imported inside the recipe, so `--help` and config errors answer at once. An error the
user fixes (groundlab.errors.UserError: config, data, files) prints one sentence and exits 2; set
GROUNDLAB_TRACEBACK=1 to see its traceback. In a sweep (-m) a failing trial, whatever the error, is recorded with
its reason and the sweep goes on (groundlab.sweep_report).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from groundlab.config import register_configs
from groundlab.recipes import matrix

log = logging.getLogger("groundlab.run")
register_configs()
OmegaConf.register_new_resolver("groundlab_recipes", matrix, replace=True)  # --help prints the recipe table


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> Optional[float]:
    from groundlab.errors import UserError, user_message
    from groundlab.runner import monitored, run_action

    try:
        value = monitored(cfg, run_action(cfg))
        if _in_sweep():  # the sweep's table reads it where the trial ran in another process (submitit)
            from groundlab.sweep_report import record_trial_result

            record_trial_result(HydraConfig.get().runtime.output_dir, value)
        return value
    except Exception as err:
        user = isinstance(err, UserError)  # data, config or file errors: the sentence says what to fix
        kind = "config error" if type(err).__name__ == "ConfigError" else "error"
        sentence = f"{kind}: {user_message(err)}" if user else f"{type(err).__name__}: {str(err).strip()[:500]}"
        if _in_sweep() and not os.environ.get("GROUNDLAB_TRACEBACK"):
            # one failed trial (a bad value, a NaN stop, out of memory) must not end the sweep: it is recorded
            # with its reason, the sweep goes on, its table lists it; no value: Optuna marks the trial failed
            from groundlab.sweep_report import record_failed_trial

            if not user:
                log.exception("trial failed")  # the traceback goes to the trial's log file
            print(f"trial failed: {sentence}", file=sys.stderr)
            record_failed_trial(HydraConfig.get().runtime.output_dir, sentence)
            return None
        if not user or os.environ.get("GROUNDLAB_TRACEBACK"):
            raise
        print(sentence, file=sys.stderr)
        sys.exit(2)


def _in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


if __name__ == "__main__":
    main()
