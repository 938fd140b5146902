"""What every run leaves in its output dir so the same command reproduces it: the resolved config,
the git commit (and whether the tree was dirty), the versions of the packages that matter, the seed."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from typing import Dict, Optional

from omegaconf import DictConfig, OmegaConf

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


def write_run_record(cfg: DictConfig) -> str:
    """Write `resolved_config.yaml` and `run_info.json` into cfg.results_dir; return that dir."""
    out = cfg.results_dir
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "resolved_config.yaml"), "w") as f:
        f.write(OmegaConf.to_yaml(cfg, resolve=True))
    info = {
        "seed": cfg.seed,
        "command": [sys.executable, *sys.argv],
        "git": git_state(os.path.dirname(os.path.abspath(__file__))),
        "packages": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    with open(os.path.join(out, "run_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    return out
