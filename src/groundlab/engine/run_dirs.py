"""Run directories and chained runs. Every run writes into `outputs/<model>/<action>/<run_name>`
(conf/config.yaml's hydra.run.dir; `results_dir` is that directory). A training run leaves its checkpoints
there, and an action that takes a model input follows the run that obviously made it, with the same model and
run_name:

- evaluate, inference, export and quantize follow `train`: its latest checkpoint (`<model>_model_latest.pth`,
  else the highest-step `model_epoch_*_step_*.pth`);
- gen_trt_engine follows `export` (`<model>.onnx`), or `quantize` for an INT8 / FP8 engine
  (`quantize/<model>.<int8|fp8>.onnx`, the Q/DQ graph).

So `python run.py experiment=quickstart action=evaluate` evaluates what `python run.py experiment=quickstart`
trained. An explicit path always wins; a default is logged in one line naming the file; nothing found is one
ConfigError sentence naming the directory looked in.

No Lightning here (checkpoint_files.py writes the checkpoints): evaluate and inference read this without
importing the training stack."""

from __future__ import annotations

import glob
import logging
import os
import re
from typing import Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from groundlab.config import ConfigError

log = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^model_epoch_(\d{3,})_step_(\d{5,})\.pth$")


def latest_path(run_dir: str, model_name: str) -> str:
    """`<run_dir>/<model>_model_latest.pth`: where training keeps its newest checkpoint."""
    return os.path.join(run_dir, f"{model_name}_model_latest.pth")


def find_resume_checkpoint(run_dir: str, model_name: str) -> Optional[str]:
    """The run dir's latest checkpoint (the `latest` file, else the highest step), or None."""
    latest = latest_path(run_dir, model_name)
    if os.path.isfile(latest):
        return latest
    found = []
    for path in glob.glob(os.path.join(run_dir, "model_epoch_*_step_*.pth")):
        m = CHECKPOINT_PATTERN.match(os.path.basename(path))
        if m:
            found.append((int(m.group(2)), path))
    return max(found)[1] if found else None


def exported_onnx(run_dir: str, model_name: str) -> str:
    """action=export's graph when export.onnx_file is not given: `<run_dir>/<model>.onnx`."""
    return os.path.join(run_dir, f"{model_name}.onnx")


def quantized_onnx(run_dir: str, model_name: str, dtype: str) -> str:
    """action=quantize's Q/DQ graph when quantize.onnx_file is not given: `<run_dir>/quantize/<model>.<dtype>.onnx`
    (dtype int8 or fp8)."""
    return os.path.join(run_dir, "quantize", f"{model_name}.{dtype}.onnx")


def followed_run_dir(results_dir: str, model_name: str, action_name: str, run_name: str, follows: str) -> str:
    """The (absolute) run dir of action `follows` with the same model and run_name: the sibling
    `<model>/<follows>/<run_name>` when results_dir ends with `<model>/<action_name>/<run_name>` (hydra.run.dir's
    layout, under whatever outputs root), else `outputs/<model>/<follows>/<run_name>` under the current directory
    (results_dir set elsewhere, e.g. a sweep's numbered dir)."""
    tail = os.path.normpath(os.path.join(model_name, action_name, run_name))
    here = os.path.normpath(os.path.abspath(results_dir))
    root = here[: -len(tail)] if here.endswith(os.sep + tail) else os.path.abspath("outputs")
    return os.path.join(root, model_name, follows, os.path.normpath(run_name))


def _left_by(follows: str, run_dir: str, model_name: str, dtype: str) -> Tuple[Optional[str], str]:
    """(the model file the `follows` run left in run_dir or None, what that file is called, for the message)."""
    if follows == "train":
        return (find_resume_checkpoint(run_dir, model_name),
                f"checkpoint ({model_name}_model_latest.pth or model_epoch_*_step_*.pth)")
    if follows == "export":
        path = exported_onnx(run_dir, model_name)
    elif follows == "quantize":
        path = quantized_onnx(run_dir, model_name, dtype)
    else:
        raise ValueError(f"no run output is known for action={follows}")
    return (path if os.path.isfile(path) else None), os.path.relpath(path, run_dir)


def chained_file(cfg: DictConfig, key: str, given: Optional[str], follows: str = "train",
                 or_keys: Sequence[str] = (), dtype: str = "int8") -> str:
    """`given`, the value of the dotted config key `key` (e.g. "export.checkpoint"), when set; else the model file
    the followed run left (module doc; `dtype` picks a quantize run's graph), logged. Nothing there: ConfigError
    naming the directory, and `or_keys` (other keys that could give the model) beside `key`."""
    if given:
        return str(given)
    model, run_name = cfg.model.name, str(cfg.run_name)
    run_dir = followed_run_dir(str(cfg.results_dir), model, cfg.action.name, run_name, follows)
    found, what = _left_by(follows, run_dir, model, dtype)
    if found is None:
        state = f"holds no {what}" if os.path.isdir(run_dir) else "does not exist"
        keys = " or ".join([f"{key}=<file>"] + [f"{k}=<file>" for k in or_keys])
        raise ConfigError(f"{key} is not given and {run_dir}, the action={follows} run this action follows (same "
                          f"model={model} and run_name={run_name}), {state}: run action={follows} first, or set "
                          f"{keys}.")
    log.info("%s: %s (the latest output of the action=%s run with this model and run_name)", key, found, follows)
    return found


def chained_settings(cfg: DictConfig, group: str) -> DictConfig:
    """cfg.<group> (evaluate or inference settings of any model) with `checkpoint` defaulted to the train run's
    latest checkpoint when the group names no model input: no checkpoint, and neither onnx_file nor trt_engine
    where the group has them (an exported graph or an engine is an explicit input too). A `backend` other than
    torch names its own file, so it is left to the backend choice (predict/backends.py) to ask for it."""
    settings = cfg[group]
    explicit = [k for k in ("onnx_file", "trt_engine") if k in settings]
    if settings.checkpoint or any(settings[k] for k in explicit) or settings.get("backend") not in (None, "torch"):
        return settings
    found = chained_file(cfg, f"{group}.checkpoint", None, or_keys=[f"{group}.{k}" for k in explicit])
    return OmegaConf.merge(settings, {"checkpoint": found})
