"""What every run leaves in its output dir so the same command reproduces it: the resolved config,
the git commit (and whether the tree was dirty), the versions of the packages that matter, the seed.

A URI in the config or the command (an s3:// / https:// data or checkpoint path) is recorded without its user info
and query string (`groundlab.io.remote_files.redact`): credentials and presigned signatures never reach the run dir.
Hydra's own copies (`.hydra/config.yaml`, `overrides.yaml`, `hydra.yaml`, written before the run starts) are
rewritten the same way."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from typing import Dict, Optional

from omegaconf import DictConfig, OmegaConf

from groundlab.io.remote_files import redact

PACKAGES = (
    "groundlab", "torch", "transformers", "tokenizers", "hydra-core", "omegaconf", "lightning",
    "pycocotools", "numpy", "pillow", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "nvidia-modelopt",
)


def git_state(repo_dir: str) -> Dict[str, Optional[str]]:
    """{"commit": sha or None, "dirty": "true"/"false" or None} of the repo holding `repo_dir`."""
    def git(*args: str) -> Optional[str]:
        try:
            out = subprocess.run(["git", "-C", repo_dir, *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else str(bool(status)).lower()}


def package_versions() -> Dict[str, str]:
    """Installed versions of PACKAGES (absent ones omitted)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def first_process() -> bool:
    """False in every process of a distributed run but the first (global rank 0), from the launchers' variables:
    Lightning's own ranks and torchrun (LOCAL_RANK, RANK), other nodes (NODE_RANK), SLURM tasks (SLURM_PROCID)."""
    return all(int(os.environ.get(k) or 0) == 0 for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def write_run_record(cfg: DictConfig) -> str:
    """Write `resolved_config.yaml` and `run_info.json` into cfg.results_dir (by the first process of a
    distributed run only: the others' commands carry the launcher's additions); return that dir."""
    out = cfg.results_dir
    os.makedirs(out, exist_ok=True)
    if not first_process():
        return out
    with open(os.path.join(out, "resolved_config.yaml"), "w") as f:
        f.write(redact(OmegaConf.to_yaml(cfg, resolve=True)))
    info = {
        "seed": cfg.seed,
        "command": [redact(a) for a in (sys.executable, *sys.argv)],
        "git": git_state(os.path.dirname(os.path.abspath(__file__))),
        "packages": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    with open(os.path.join(out, "run_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    _redact_hydra_files(os.path.join(out, ".hydra"))
    return out


def _redact_hydra_files(folder: str) -> None:
    """Rewrite Hydra's saved config files in `folder` where they hold a URI with credentials or a signature."""
    if not os.path.isdir(folder):
        return
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not name.endswith(".yaml") or not os.path.isfile(path):
            continue
        with open(path) as f:
            text = f.read()
        clean = redact(text)
        if clean != text:
            with open(path, "w") as f:
                f.write(clean)
