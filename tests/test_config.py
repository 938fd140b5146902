"""Config contract: every group composes onto its typed schema; typos and wrong types fail naming the
dotted key; cross-field rules fail with one sentence; start-up does not import torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from conftest import REPO, SMALL_SYNTHETIC, TINY_GDINO, run_py
from groundlab.config import ConfigError, check_config
from groundlab.config import schema_action, schema_dataset, schema_model


def test_default_config_composes_typed(compose):
    cfg = compose()
    assert OmegaConf.get_type(cfg.model) is schema_model.GDinoModelConfig
    assert OmegaConf.get_type(cfg.dataset) is schema_dataset.DatasetConfig
    assert OmegaConf.get_type(cfg.train) is schema_action.GDinoTrainConfig
    assert OmegaConf.get_type(cfg.train.optim) is schema_action.OptimConfig
    check_config(cfg)


@pytest.mark.parametrize(
    "overrides, model_type, train_type",
    [
        (["model=mask_gdino"], schema_model.GDinoModelConfig, schema_action.GDinoTrainConfig),
        # the bare action schema (name: train) stands in until action=train has its own file
        (["model=mal", "dataset=mal_synthetic", "action=schema_action"], schema_model.MALModelConfig,
         schema_action.MALTrainConfig),
    ],
)
def test_model_selects_its_action_settings(compose, overrides, model_type, train_type):
    cfg = compose(overrides)
    assert OmegaConf.get_type(cfg.model) is model_type
    assert OmegaConf.get_type(cfg.train) is train_type
    check_config(cfg)


def test_mask_gdino_inherits_gdino_values(compose):
    g, m = compose().model, compose(["model=mask_gdino"]).model
    assert m.name == "mask_gdino" and m.has_mask
    assert (m.num_queries, m.max_text_len, m.hidden_dim) == (g.num_queries, g.max_text_len, g.hidden_dim)


@pytest.mark.parametrize("dataset", ["odvg", "coco", "raw", "coco_raw", "synthetic"])
def test_every_dataset_preset_composes(compose, dataset):
    cfg = compose([f"dataset={dataset}"])
    assert cfg.dataset.type == dataset


def test_tao_spec_keys_reach_the_code_that_uses_them(compose):
    """TAO's spec keys (composition rejects unknown names) drive the optimizer, the model and the prompts."""
    import torch

    from groundlab.data.build import build_grounding_dataset
    from groundlab.models.gdino.build import build_gdino
    from groundlab.models.gdino.optim import build_optimizer

    cfg = compose(TINY_GDINO + SMALL_SYNTHETIC + [
        "train.optim.lr=1e-4", "train.optim.lr_backbone=3e-6", "train.optim.lr_linear_proj_mult=0.5",
        "model.max_text_len=128", "dataset.max_labels=3"])
    model = build_gdino(cfg.model).model.eval()
    lrs = {g["name"]: g["lr"] for g in build_optimizer(model, cfg.train.optim).param_groups}
    assert lrs == pytest.approx({"base": 1e-4, "backbone": 3e-6, "linear_proj": 5e-5})
    ids = torch.tensor([[101, 4937, 1012, 102]])
    with torch.no_grad():
        out = model(torch.randn(1, 3, 96, 96), ids, torch.ones_like(ids))
    assert out["pred_logits"].shape[-1] == 128  # one column per token of the model's text length
    ds, collate = build_grounding_dataset(cfg, "train", augment=False)
    items = [ds[i] for i in range(4)]
    for item in items:
        positives = set(item["target"]["labels"].tolist())
        assert len(item["prompt_class_ids"]) == max(3, len(positives))  # negatives fill up to 3 of 9 classes
    assert all(t["positive_map"].shape[-1] == 128 for t in collate(items)["targets"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.max_txt_len=3", "model.max_txt_len"),
        ("train.optim.lrr=1", "train.optim.lrr"),
        ("dataset.augmentation.scaless=[1]", "dataset.augmentation.scaless"),
        ("sed=1", "sed"),
    ],
)
def test_typo_fails_naming_the_key(override, key):
    proc = run_py(override)
    assert proc.returncode != 0
    assert key in proc.stderr + proc.stdout


def test_wrong_type_fails_naming_the_key():
    proc = run_py("train.num_epochs=many")
    assert proc.returncode != 0
    out = proc.stderr + proc.stdout
    assert "train.num_epochs" in out and "many" in out


def test_typo_in_a_yaml_file_names_file_and_key(tmp_path):
    conf = tmp_path / "conf"
    subprocess.run(["cp", "-r", str(REPO / "conf"), str(conf)], check=True)
    with open(conf / "model" / "gdino.yaml", "a") as f:
        f.write("num_querys: 100\n")
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), f"--config-path={conf}"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    out = proc.stderr + proc.stdout
    assert proc.returncode != 0
    assert "num_querys" in out and "model/gdino" in out


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["model.num_queries=100", "model.num_select=300"], "model.num_queries=100 must be >= model.num_select=300"),
        (["model.num_feature_levels=2"], "model.num_feature_levels=2"),
        (["dataset.augmentation.train_random_crop_min=700"], "train_random_crop_min=700"),
        (["model=mal"], "model=mal reads dataset.type"),
        (["dataset.synthetic.min_objects=5", "dataset.synthetic.max_objects=2"], "min_objects=5"),
        (["model.hidden_dim=100"], "divisible by model.nheads"),
    ],
)
def test_cross_field_rules(compose, overrides, fragment):
    with pytest.raises(ConfigError, match=None) as info:
        check_config(compose(overrides))
    assert fragment in str(info.value)


def test_cross_field_error_from_run_py_is_one_clear_message():
    proc = run_py("model.num_queries=10", "model.num_select=20")
    assert proc.returncode == 2
    assert "config error" in proc.stderr and "model.num_queries=10" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_startup_path_does_not_import_heavy_libraries():
    code = (
        "import sys, runpy; sys.argv=['run.py','--help'];\n"
        "try:\n runpy.run_path('run.py', run_name='__main__')\n"
        "except SystemExit: pass\n"
        "heavy=[m for m in ('torch','transformers','lightning') if m in sys.modules]\n"
        "print('HEAVY', heavy)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in proc.stdout, proc.stdout + proc.stderr


def test_unsupported_pair_fails_at_start_up_naming_the_pairs_that_exist():
    proc = run_py("model=mal", "dataset=mal_synthetic", "action=export")
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert err.count("\n") == 0, err  # one sentence, no traceback
    assert "model=mal action=export does not exist" in err and "action={train, evaluate, inference}" in err


def test_help_prints_the_recipe_matrix():
    from groundlab.recipes import RECIPES

    out = run_py("--help").stdout
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()
            if line.split() and line.split()[0] in ("gdino", "mask_gdino", "mal")}
    header = next(line.split() for line in out.splitlines() if line.split()[:2] == ["train", "evaluate"])
    for model, marks in rows.items():
        for action, mark in zip(header, marks):
            assert (mark == "x") == ((model, action) in RECIPES), (model, action)
    assert rows["mal"][header.index("visualize")] == "-" and rows["gdino"][header.index("train")] == "x"
