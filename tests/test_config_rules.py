"""Start-up validation of choices and ranges (groundlab.config.checks.RULES) and of the rules that span keys:
each failure is one sentence naming the dotted key, its value and what is allowed; all failures of a config
come together; from run.py a config error exits 2 with no traceback and before any heavy import."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO, run_py
from groundlab.config import ConfigError, check_config
from groundlab.config.checks import RULES

MAL = ["model=mal", "dataset=mal_synthetic"]
AUTOLABEL = ["model=mask_gdino", "action=autolabel"]

# (context overrides, the bad override, a fragment of the message)
CASES = [
    # train: both models (Grounding DINO here, MAL shares the keys)
    ([], "train.num_epochs=0", "train.num_epochs=0 must be >= 1."),
    ([], "train.checkpoint_interval=0", "train.checkpoint_interval=0 must be >= 1."),
    ([], "train.checkpoint_interval_unit=epochs", "train.checkpoint_interval_unit='epochs' must be one of epoch, step."),
    ([], "train.validation_interval=0", "train.validation_interval=0 must be >= 1."),
    (MAL, "train.validation_interval_unit=steps", "train.validation_interval_unit='steps' must be one of epoch, step."),
    ([], "train.precision=fp8", "train.precision='fp8' must be one of fp32, fp16, bf16."),
    (MAL, "train.precision=16", "train.precision='16' must be one of fp32, fp16, bf16."),
    ([], "train.num_gpus=-1", "train.num_gpus=-1 must be >= 0."),
    ([], "train.gpu_ids=[0,-1]", "train.gpu_ids=[0, -1] must be a list of values, each >= 0."),
    ([], "train.num_nodes=0", "train.num_nodes=0 must be >= 1."),
    ([], "train.max_time_minutes=0", "train.max_time_minutes=0.0 must be > 0."),
    ([], "train.clip_grad_norm=-0.1", "train.clip_grad_norm=-0.1 must be >= 0."),
    ([], "train.distributed_strategy=deepspeed", "train.distributed_strategy='deepspeed' must be one of ddp, fsdp."),
    (MAL, "train.distributed_strategy=fsdp", "train.distributed_strategy='fsdp' must be ddp for model=mal"),
    # train: Grounding DINO's optimizer
    ([], "train.optim.optimizer=Adam", "train.optim.optimizer='Adam' must be one of AdamW, SGD."),
    ([], "train.optim.lr=-1", "train.optim.lr=-1.0 must be > 0."),
    ([], "train.optim.lr_backbone=0", "train.optim.lr_backbone=0.0 must be > 0."),
    ([], "train.optim.lr_linear_proj_mult=0", "train.optim.lr_linear_proj_mult=0.0 must be > 0."),
    ([], "train.optim.momentum=1", "train.optim.momentum=1.0 must be in [0, 1)."),
    ([], "train.optim.weight_decay=-1", "train.optim.weight_decay=-1.0 must be >= 0."),
    ([], "train.optim.lr_scheduler=step", "train.optim.lr_scheduler='step' must be one of MultiStep, cosine."),
    ([], "train.optim.lr_steps=[0]", "train.optim.lr_steps=[0] must be a list of values, each >= 1."),
    ([], "train.optim.lr_decay=0", "train.optim.lr_decay=0.0 must be in (0, 1]."),
    ([], "train.optim.warmup_steps=-1", "train.optim.warmup_steps=-1 must be >= 0."),
    # train: MAL
    (MAL, "train.batch_size=0", "train.batch_size=0 must be >= 1."),
    (MAL, "train.accum_grad_batches=0", "train.accum_grad_batches=0 must be >= 1."),
    (MAL, "train.optim_type=sgd", "train.optim_type='sgd' must be adamw (the only value implemented)."),
    (MAL, "train.lr=0", "train.lr=0.0 must be > 0."),
    (MAL, "train.min_lr=-1", "train.min_lr=-1.0 must be >= 0."),
    (MAL, "train.min_lr_rate=1.5", "train.min_lr_rate=1.5 must be in [0, 1]."),
    (MAL, "train.wd=-1", "train.wd=-1.0 must be >= 0."),
    (MAL, "train.optim_eps=0", "train.optim_eps=0.0 must be > 0."),
    (MAL, "train.optim_betas=[0.9]", "train.optim_betas=[0.9] must be a list of 2 values, each in [0, 1)."),
    (MAL, "train.warmup_epochs=-1", "train.warmup_epochs=-1.0 must be >= 0."),
    (MAL, "train.num_wave=0", "train.num_wave=0.0 must be > 0."),
    (MAL, "train.margin_rate=[0,1,2]", "train.margin_rate=[0.0, 1.0, 2.0] must be a list of 2 values, each >= 0."),
    (MAL, "train.loss_mil_weight=-1", "train.loss_mil_weight=-1.0 must be >= 0."),
    (MAL, "train.loss_crf_weight=-1", "train.loss_crf_weight=-1.0 must be >= 0."),
    (MAL, "train.loss_mil_step=-1", "train.loss_mil_step=-1 must be >= 0."),
    (MAL, "train.loss_crf_step=-1", "train.loss_crf_step=-1 must be >= 0."),
    (MAL, "train.crf_zeta=0", "train.crf_zeta=0.0 must be > 0."),
    (MAL, "train.crf_kernel_size=-1", "train.crf_kernel_size=-1 must be >= 1."),
    (MAL, "train.crf_num_iter=-1", "train.crf_num_iter=-1 must be >= 0."),
    (MAL, "train.crf_size_ratio=0", "train.crf_size_ratio=0 must be > 0."),
    (MAL, "train.crf_value_low_thres=0", "train.crf_value_low_thres=0.0 must be in (0, 1)."),
    (MAL, "train.crf_value_high_thres=1", "train.crf_value_high_thres=1.0 must be in (0, 1)."),
    # model: Grounding DINO (TAO keys pinned to what we implement, then ranges)
    ([], "model.two_stage_type=no", "model.two_stage_type='no' must be standard (the only value implemented)."),
    ([], "model.position_embedding=learned", "model.position_embedding='learned' must be sine (the only value"),
    ([], "model.loss_types=[labels,points]", "model.loss_types=['labels', 'points'] must be a list of values, each "
                                              "one of labels, boxes, masks."),
    ([], "model.num_queries=0", "model.num_queries=0 must be >= 1."),
    ([], "model.num_select=0", "model.num_select=0 must be >= 1."),
    ([], "model.dropout=1", "model.dropout=1.0 must be in [0, 1)."),
    ([], "model.fusion_dropout=-0.1", "model.fusion_dropout=-0.1 must be in [0, 1)."),
    ([], "model.fusion_droppath=1", "model.fusion_droppath=1.0 must be in [0, 1)."),
    ([], "model.focal_alpha=2", "model.focal_alpha=2.0 must be in [0, 1]."),
    ([], "model.dn_number=-1", "model.dn_number=-1 must be >= 0."),
    ([], "model.dn_label_noise_ratio=2", "model.dn_label_noise_ratio=2.0 must be in [0, 1]."),
    ([], "model.dn_box_noise_scale=-1", "model.dn_box_noise_scale=-1.0 must be >= 0."),
    # model: MAL
    (MAL, "model.teacher_momentum=1", "model.teacher_momentum=1.0 must be in [0, 1)."),
    (MAL, "model.vit_dpr=1", "model.vit_dpr=1.0 must be in [0, 1)."),
    (MAL, "model.mask_thres=[1.5]", "model.mask_thres=[1.5] must be a list of 1 or 3 values, each in [0, 1]."),
    (MAL, "model.mask_thres=[0.1,0.2]", "model.mask_thres=[0.1, 0.2] must be a list of 1 or 3 values"),
    (MAL, "model.test_margin_rate=[0.6]", "model.test_margin_rate=[0.6] must be a list of 2 values, each >= 0."),
    # dataset
    ([], "dataset.batch_size=0", "dataset.batch_size=0 must be >= 1."),
    ([], "dataset.workers=-1", "dataset.workers=-1 must be >= 0."),
    (MAL, "dataset.num_workers_per_gpu=-1", "dataset.num_workers_per_gpu=-1 must be >= 0."),
    (MAL, "dataset.crop_size=0", "dataset.crop_size=0 must be >= 1."),
    (MAL, "dataset.min_obj_size=-1", "dataset.min_obj_size=-1.0 must be >= 0."),
    (["dataset=raw"], "dataset.infer_data_sources.data_type=od",
     "dataset.infer_data_sources.data_type='od' must be one of OD, VG."),
    ([], "dataset.val_data_sources.data_type=RES", "dataset.val_data_sources.data_type='RES' must be one of OD, VG."),
    ([], "dataset.test_data_sources.data_type=vg", "dataset.test_data_sources.data_type='vg' must be one of OD, VG."),
    # evaluate / inference
    ([], "evaluate.conf_threshold=1.5", "evaluate.conf_threshold=1.5 must be in [0, 1]."),
    ([], "evaluate.nms_threshold=1.5", "evaluate.nms_threshold=1.5 must be in [0, 1]."),
    (["model=mask_gdino"], "evaluate.mask_threshold=-0.5", "evaluate.mask_threshold=-0.5 must be in [0, 1]."),
    (MAL, "evaluate.batch_size=0", "evaluate.batch_size=0 must be >= 1."),
    ([], "evaluate.num_gpus=-1", "evaluate.num_gpus=-1 must be >= 0."),
    (MAL, "evaluate.gpu_ids=[-1]", "evaluate.gpu_ids=[-1] must be a list of values, each >= 0."),
    ([], "inference.conf_threshold=-0.1", "inference.conf_threshold=-0.1 must be in [0, 1]."),
    ([], "inference.text_threshold=2", "inference.text_threshold=2.0 must be in [0, 1]."),
    (["model=mask_gdino"], "evaluate.ioi_threshold=1.5", "evaluate.ioi_threshold=1.5 must be in [0, 1]."),
    (["model=mask_gdino"], "evaluate.text_threshold=-1", "evaluate.text_threshold=-1.0 must be in [0, 1]."),
    (["model=mask_gdino"], "inference.ioi_threshold=2", "inference.ioi_threshold=2.0 must be in [0, 1]."),
    ([], "inference.nms_threshold=1.5", "inference.nms_threshold=1.5 must be in [0, 1]."),
    (["model=mask_gdino"], "inference.mask_threshold=2", "inference.mask_threshold=2.0 must be in [0, 1]."),
    ([], "inference.outline_width=0", "inference.outline_width=0 must be >= 1."),
    (MAL, "inference.batch_size=0", "inference.batch_size=0 must be >= 1."),
    (MAL, "inference.draw_images=-2", "inference.draw_images=-2 must be >= -1."),
    ([], "inference.num_gpus=-1", "inference.num_gpus=-1 must be >= 0."),
    ([], "inference.gpu_ids=[-1]", "inference.gpu_ids=[-1] must be a list of values, each >= 0."),
    ([], "evaluate.backend=onnx", "evaluate.backend='onnx' must be one of torch, onnxruntime, tensorrt."),
    (["model=mask_gdino"], "inference.backend=trt", "inference.backend='trt' must be one of torch, onnxruntime, "
                                                    "tensorrt."),
    # export
    ([], "export.input_height=16", "export.input_height=16 must be >= 32."),
    (["model=mask_gdino"], "export.input_width=0", "export.input_width=0 must be >= 32."),
    ([], "export.batch_size=-2", "export.batch_size=-2 must be -1 (dynamic) or >= 1."),
    ([], "export.opset_version=13", "export.opset_version=13 must be >= 16."),
    ([], "export.deform_attn_impl=pallas", "export.deform_attn_impl='pallas' must be one of grid_sample, "
                                                  "gather_matmul."),
    # action=visualize
    # gen_trt_engine (action=trt)
    (["action=trt"], "gen_trt_engine.tensorrt.data_type=int4",
     "gen_trt_engine.tensorrt.data_type='int4' must be one of FP32, FP16, FP8, INT8."),
    (["action=trt"], "gen_trt_engine.tensorrt.workspace_size=0", "gen_trt_engine.tensorrt.workspace_size=0 must be >= 1."),
    (["model=mask_gdino"], "gen_trt_engine.tensorrt.min_batch_size=0",
     "gen_trt_engine.tensorrt.min_batch_size=0 must be >= 1."),
    ([], "gen_trt_engine.tensorrt.opt_batch_size=0", "gen_trt_engine.tensorrt.opt_batch_size=0 must be >= 1."),
    ([], "gen_trt_engine.tensorrt.max_batch_size=0", "gen_trt_engine.tensorrt.max_batch_size=0 must be >= 1."),
    (AUTOLABEL, "autolabel.box_source=yolo", "autolabel.box_source='yolo' must be one of coco, gdino."),
    (AUTOLABEL, "autolabel.box_threshold=1.5", "autolabel.box_threshold=1.5 must be in [0, 1]."),
    (AUTOLABEL, "autolabel.missing_masks=skip", "autolabel.missing_masks='skip' must be one of box, drop_image."),
    ([], "action.split=tarin", "action.split='tarin' must be one of train, val, test."),
    ([], "action.num_images=-1", "action.num_images=-1 must be >= 0."),
    ([], "action.outline_width=0", "action.outline_width=0 must be >= 1."),
    # rules that span keys
    ([], "model.has_mask=true", "model.has_mask=true must be false with model=gdino"),
    (["model=mask_gdino"], "model.has_mask=false", "model.has_mask=false must be true with model=mask_gdino"),
    ([], "model.loss_types=[labels,boxes,masks]", "has masks, which only model=mask_gdino has"),
    ([], "model.num_region_queries=100", "region queries (referring segmentation) come with model=mask_gdino"),
    (["model=mask_gdino"], "model.num_region_queries=50", "model.num_region_queries=50 must be 0 (no region head) "
                                                          "or a perfect square"),
    (["model=mask_gdino", "model.num_region_queries=100"], "model.region_dec_layers=0",
     "model.region_dec_layers=0 must be >= 1 with region queries."),
    (MAL, "train.margin_rate=[1.2,0]", "train.margin_rate=[1.2, 0.0] must be [low, high] with low <= high."),
    (MAL, "train.crf_kernel_size=4", "train.crf_kernel_size=4 must be odd"),
    (MAL, "train.crf_value_low_thres=0.9", "train.crf_value_low_thres=0.9 must be below train.crf_value_high_thres=0.9"),
    (["dataset=synthetic"], "dataset.train_data_sources=[{image_dir: a, json_file: b.jsonl}]",
     "dataset.train_data_sources is set, but dataset=synthetic generates its own splits and would ignore it: "
     "choose dataset=odvg or dataset=coco."),
    (MAL, "dataset.train_ann_path=boxes.json", "dataset.train_ann_path is set, but dataset=mal_synthetic generates "
                                               "its own splits and would ignore it: choose dataset=mal_coco."),
]


@pytest.mark.parametrize("context, override, fragment", CASES, ids=[c[1] for c in CASES])
def test_rule_fails_naming_key_value_and_what_is_allowed(compose, context, override, fragment):
    cfg = compose(context + [override])
    with pytest.raises(ConfigError) as info:
        check_config(cfg)
    assert fragment in str(info.value)


def test_every_rule_has_a_case():
    tested = {override.split("=", 1)[0] for _, override, _ in CASES}
    assert not [key for key, _ in RULES if key not in tested]


@pytest.mark.parametrize("context", [[], MAL, ["model=mask_gdino"], ["experiment=quickstart"],
                                     ["experiment=mal_quickstart"]], ids=str)
def test_defaults_and_experiments_pass(compose, context):
    check_config(compose(context))


@pytest.mark.parametrize("override", ["train.optim.lr_scheduler=multistep", "train.optim.optimizer=adamw",
                                      "train.optim.optimizer=SGD", "inference.nms_threshold=null",
                                      "train.max_time_minutes=null", "train.optim.momentum=0"])
def test_allowed_values_pass(compose, override):
    check_config(compose([override]))


def test_every_failure_is_reported_at_once(compose):
    cfg = compose(["train.optim.lr=-1", "train.precision=fp8", "inference.conf_threshold=2",
                   "model.num_queries=10", "model.num_select=20"])
    with pytest.raises(ConfigError) as info:
        check_config(cfg)
    lines = str(info.value).splitlines()
    assert lines[0] == "invalid config, 4 problems:"
    assert len(lines) == 5 and all(line.startswith("  ") for line in lines[1:])


def test_bad_value_from_run_py_exits_2_with_one_line(tmp_path):
    proc = run_py("action=train", "train.optim.lr=-1", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert err == "config error: invalid config: train.optim.lr=-1.0 must be > 0.", err
    assert "Traceback" not in proc.stderr + proc.stdout


def test_config_error_answers_before_heavy_imports(tmp_path):
    """The checks run before the recipe module (lightning, torch) is imported."""
    code = (
        "import sys, runpy\n"
        f"sys.argv=['run.py','action=train','model=mal','dataset=mal_synthetic','train.lr=-1','hydra.run.dir={tmp_path}']\n"
        "try:\n runpy.run_path('run.py', run_name='__main__')\n"
        "except SystemExit as e: print('EXIT', e.code)\n"
        "print('HEAVY', [m for m in ('torch','transformers','lightning') if m in sys.modules])"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "EXIT 2" in proc.stdout and "HEAVY []" in proc.stdout, proc.stdout + proc.stderr
    assert "train.lr=-1.0 must be > 0." in proc.stderr
