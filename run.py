"""groundlab's only entrypoint: `python run.py [experiment=...] [model=...] [action=...] [key=value ...]`.

Composes the typed config, checks it, and runs `RECIPES[(model, action)]` (src/groundlab/recipes.py). Returns
the metric named by `monitor` so Hydra sweepers (grid, Optuna) can optimize it. Heavy libraries (torch,
transformers, lightning) are imported inside the recipe, so `--help` and config errors answer at once. An error the
user fixes (groundlab.errors.UserError: config, data, files) prints one sentence and exits 2; set
GROUNDLAB_TRACEBACK=1 to see its traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import hydra
from omegaconf import DictConfig, OmegaConf

from groundlab.config import register_configs
from groundlab.recipes import matrix

register_configs()
OmegaConf.register_new_resolver("groundlab_recipes", matrix, replace=True)  # --help prints the recipe table


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> Optional[float]:
    from groundlab.errors import UserError, user_message
    from groundlab.runner import monitored, run_action

    try:
        return monitored(cfg, run_action(cfg))
    except UserError as err:  # data, config or file errors: the sentence says what to fix
        if os.environ.get("GROUNDLAB_TRACEBACK"):
            raise
        kind = "config error" if type(err).__name__ == "ConfigError" else "error"
        print(f"{kind}: {user_message(err)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
