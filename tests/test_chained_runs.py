"""Chained runs (engine/run_dirs.py): an action that takes a model input and is not given one uses what the run it
follows left, with the same model and run_name: evaluate / inference / export / quantize the train run's latest
checkpoint, gen_trt_engine the export run's graph (the quantize run's for INT8 / FP8). The file taken is logged; an
explicit path wins; nothing found is one sentence naming the directory looked in."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from conftest import TINY_GDINO
from groundlab.config import ConfigError
from groundlab.engine.run_dirs import (chained_file, chained_settings, exported_onnx, followed_run_dir, latest_path,
                                       quantized_onnx)
from groundlab.runner import run_action

# the quickstart recipe (run_name quickstart) on the tiny model and a few small synthetic scenes
QUICK = ["experiment=quickstart", *TINY_GDINO, "dataset.synthetic.num_train=4", "dataset.synthetic.num_val=4",
         "dataset.synthetic.image_size=[64,64]", "dataset.workers=0", "dataset.batch_size=4",
         "dataset.augmentation.test_random_resize=64"]
# a tiny MAL as tests/test_mal_train.py's (run_name mal_quickstart)
TINY_MAL = ["experiment=mal_quickstart", "train.max_time_minutes=null",
            "model.vit_overrides={hidden_size:64,num_hidden_layers:2,num_attention_heads:2,intermediate_size:128}",
            "model.mask_head_hidden_channel=32", "model.mask_head_out_channel=32", "dataset.crop_size=64",
            "dataset.synthetic.num_train=4", "dataset.synthetic.num_val=4", "dataset.synthetic.image_size=[96,96]"]


def run_dir(root, model: str, action: str, run_name: str) -> str:
    """A run dir as hydra.run.dir lays it out under `root` (the outputs dir)."""
    return str(root / model / action / run_name)


# ------------------------------------------------------------------------------------ the rule (pure)
def test_the_followed_run_is_the_sibling_of_a_run_dir(tmp_path):
    here = run_dir(tmp_path / "outputs", "gdino", "evaluate", "quickstart")
    assert followed_run_dir(here, "gdino", "evaluate", "quickstart", "train") == str(
        tmp_path / "outputs" / "gdino" / "train" / "quickstart")
    # a run_name with a folder in it, and a trailing slash
    here = run_dir(tmp_path, "mal", "inference", "exp/a") + "/"
    assert followed_run_dir(here, "mal", "inference", "exp/a", "train") == str(tmp_path / "mal" / "train" / "exp" / "a")
    assert followed_run_dir(run_dir(tmp_path, "gdino", "gen_trt_engine", "r"), "gdino", "gen_trt_engine", "r",
                            "export") == str(tmp_path / "gdino" / "export" / "r")


def test_any_other_results_dir_looks_under_outputs_of_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    expected = str(tmp_path / "outputs" / "gdino" / "train" / "quickstart")
    for results_dir in ("unused", str(tmp_path / "elsewhere"), str(tmp_path / "multirun" / "gdino" / "evaluate" / "0"),
                        run_dir(tmp_path, "mask_gdino", "evaluate", "quickstart"),  # another model's run dir
                        run_dir(tmp_path, "gdino", "evaluate", "other")):  # another run_name's
        assert followed_run_dir(results_dir, "gdino", "evaluate", "quickstart", "train") == expected, results_dir


# ------------------------------------------------------------------------------------ which file, which key
def test_the_latest_checkpoint_else_the_highest_step(compose, tmp_path):
    train = tmp_path / "gdino" / "train" / "quickstart"
    train.mkdir(parents=True)
    cfg = compose(QUICK + ["action=export"], results_dir=run_dir(tmp_path, "gdino", "export", "quickstart"))
    for name in ("model_epoch_001_step_00009.pth", "model_epoch_002_step_00010.pth", "model_epoch_000_step_00002.pth"):
        (train / name).write_bytes(b"")
    assert chained_file(cfg, "export.checkpoint", None) == str(train / "model_epoch_002_step_00010.pth")
    open(latest_path(str(train), "gdino"), "wb").close()
    assert chained_file(cfg, "export.checkpoint", None) == str(train / "gdino_model_latest.pth")


def test_an_explicit_input_wins(compose, tmp_path):
    train = tmp_path / "gdino" / "train" / "quickstart"
    train.mkdir(parents=True)
    open(latest_path(str(train), "gdino"), "wb").close()
    here = run_dir(tmp_path, "gdino", "evaluate", "quickstart")
    assert chained_settings(compose(QUICK + ["action=evaluate"], results_dir=here), "evaluate").checkpoint == str(
        train / "gdino_model_latest.pth")
    ev = chained_settings(compose(QUICK + ["action=evaluate", "evaluate.checkpoint=mine.pth"], results_dir=here),
                          "evaluate")
    assert ev.checkpoint == "mine.pth"
    export = compose(QUICK + ["action=export"], results_dir=run_dir(tmp_path, "gdino", "export", "quickstart"))
    assert chained_file(export, "export.checkpoint", "mine.pth") == "mine.pth"
    # an exported graph or an engine is an explicit model input too: no checkpoint is added beside it
    for key in ("onnx_file=m.onnx", "trt_engine=m.engine"):
        ev = chained_settings(compose(QUICK + ["action=evaluate", f"evaluate.{key}"], results_dir=here), "evaluate")
        assert ev.checkpoint is None, key
    # a backend naming another file leaves the backend choice to ask for it
    ev = chained_settings(compose(QUICK + ["action=inference", "inference.backend=onnxruntime"],
                                  results_dir=run_dir(tmp_path, "gdino", "inference", "quickstart")), "inference")
    assert ev.checkpoint is None


def test_a_trt_engine_follows_the_export_run_or_for_int8_the_quantize_run(compose, tmp_path):
    here = run_dir(tmp_path, "gdino", "gen_trt_engine", "quickstart")
    export_dir, quantize_dir = (run_dir(tmp_path, "gdino", a, "quickstart") for a in ("export", "quantize"))
    for path in (exported_onnx(export_dir, "gdino"), quantized_onnx(quantize_dir, "gdino", "int8")):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "wb").close()
    cfg = compose(QUICK + ["action=trt"], results_dir=here)
    assert chained_file(cfg, "gen_trt_engine.onnx_file", None, "export") == os.path.join(export_dir, "gdino.onnx")
    assert chained_file(cfg, "gen_trt_engine.onnx_file", None, "quantize", dtype="int8") == os.path.join(
        quantize_dir, "quantize", "gdino.int8.onnx")
    with pytest.raises(ConfigError) as err:
        chained_file(cfg, "gen_trt_engine.onnx_file", None, "quantize", dtype="fp8")
    assert str(err.value) == (
        f"gen_trt_engine.onnx_file is not given and {quantize_dir}, the action=quantize run this action follows "
        f"(same model=gdino and run_name=quickstart), holds no quantize/gdino.fp8.onnx: run action=quantize first, or "
        f"set gen_trt_engine.onnx_file=<file>.")


# ------------------------------------------------------------------------------------ nothing found: one sentence
@pytest.mark.parametrize("model, action, key, or_keys", [
    ("gdino", "evaluate", "evaluate.checkpoint", " or evaluate.onnx_file=<file> or evaluate.trt_engine=<file>"),
    ("mask_gdino", "inference", "inference.checkpoint",
     " or inference.onnx_file=<file> or inference.trt_engine=<file>"),
    ("gdino", "export", "export.checkpoint", ""),
    ("gdino", "quantize", "quantize.model_path", ""),
    ("mal", "evaluate", "evaluate.checkpoint", ""),
    ("mal", "inference", "inference.checkpoint", ""),
])
def test_no_checkpoint_found_names_where_it_looked(compose, tmp_path, model, action, key, or_keys):
    overrides = TINY_MAL if model == "mal" else QUICK + [f"model={model}"]
    run_name = "mal_quickstart" if model == "mal" else "quickstart"
    train = tmp_path / model / "train" / run_name
    cfg = compose(overrides + [f"action={action}"], results_dir=run_dir(tmp_path, model, action, run_name))
    sentence = (f"{key} is not given and {train}, the action=train run this action follows (same model={model} and "
                f"run_name={run_name}), {{}}: run action=train first, or set {key}=<file>{or_keys}.")
    with pytest.raises(ConfigError) as err:
        run_action(cfg)
    assert str(err.value) == sentence.format("does not exist")
    train.mkdir(parents=True)  # a train run that has not written a checkpoint yet
    with pytest.raises(ConfigError) as err:
        run_action(cfg)
    assert str(err.value) == sentence.format(f"holds no checkpoint ({model}_model_latest.pth or "
                                             f"model_epoch_*_step_*.pth)")


# ------------------------------------------------------------------------------------ end to end
def test_evaluate_after_training_finds_and_names_its_checkpoint(compose, tmp_path, caplog):
    """`experiment=quickstart action=evaluate` evaluates outputs/gdino/train/quickstart/gdino_model_latest.pth (a
    tiny model saved where training writes it) and says so in one log line and in results.json."""
    from groundlab.models.gdino.build import build_gdino, save_gdino

    train = tmp_path / "outputs" / "gdino" / "train" / "quickstart"
    train.mkdir(parents=True)
    torch.manual_seed(0)
    cfg = compose(QUICK)
    latest = save_gdino(latest_path(str(train), "gdino"), build_gdino(cfg.model).model, cfg.model)
    here = run_dir(tmp_path / "outputs", "gdino", "evaluate", "quickstart")
    caplog.set_level(logging.INFO, logger="groundlab")
    metrics = run_action(compose(QUICK + ["action=evaluate"], results_dir=here))
    assert 0.0 <= metrics["mAP50"] <= 1.0
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("evaluate.checkpoint: ")]
    assert said == [f"evaluate.checkpoint: {latest} (the latest output of the action=train run with this model and "
                    f"run_name)"]
    results = json.loads((tmp_path / "outputs" / "gdino" / "evaluate" / "quickstart" / "evaluate" / "results.json")
                         .read_text())
    assert results["checkpoint"] == latest and results["backend"] == "torch"


def test_mal_evaluate_finds_its_train_runs_checkpoint(compose, tmp_path, caplog):
    """model=mal: an untrained tiny MAL checkpoint (student and teacher, as training writes it) in the train run
    dir is the one evaluated."""
    from groundlab.models.checkpoint import save_checkpoint
    from groundlab.models.mal.build import build_mal_network

    train = tmp_path / "mal" / "train" / "mal_quickstart"
    train.mkdir(parents=True)
    torch.manual_seed(0)
    cfg = compose(TINY_MAL)
    net = build_mal_network(cfg.model, 64)
    state = {f"{which}.{k}": v for which in ("student", "teacher") for k, v in net.state_dict().items()}
    latest = save_checkpoint(latest_path(str(train), "mal"), net, cfg.model, ["red circle", "blue square"],
                             state_dict=state, extra={"crop_size": 64, "category_ids": [1, 2]})
    here = run_dir(tmp_path, "mal", "evaluate", "mal_quickstart")
    caplog.set_level(logging.INFO, logger="groundlab")
    metrics = run_action(compose(TINY_MAL + ["action=evaluate"], results_dir=here))
    assert 0.0 <= metrics["mIoU"] <= 1.0
    assert any(r.getMessage().startswith(f"evaluate.checkpoint: {latest} ") for r in caplog.records)
    results = json.loads((tmp_path / "mal" / "evaluate" / "mal_quickstart" / "evaluate" / "results.json").read_text())
    assert results["checkpoint"] == latest
