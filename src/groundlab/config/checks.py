"""Start-up checks of a composed config, run by the runner before any heavy import: TAO's aliases resolved
(groundlab.config.aliases), then every choice and range (RULES: one sentence per failure naming the dotted key,
its value and what is allowed), then the rules that span keys. All failures of a config are reported together."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Sequence, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf

from groundlab.config.aliases import resolve_aliases
from groundlab.config.schema_autolabel import BOX_SOURCES, MISSING_MASKS
from groundlab.config.schema_dataset import DATASET_TYPES, MAL_DATASET_TYPES, SOURCE_DATA_TYPES, SYNTHETIC_TYPES
from groundlab.config.schema_model import MODEL_NAMES
from groundlab.config.schema_trt import DATA_TYPES
from groundlab.errors import UserError


class ConfigError(UserError, ValueError):
    """A config value (or combination of values) that cannot work; the message names the keys."""


# ------------------------------------------------------------------------------------ choices and ranges
@dataclass(frozen=True)
class Rule:
    """`ok(value)` says whether a value is allowed; `allowed` ends the sentence "<key>=<value> must be ..."."""

    ok: Callable[[Any], bool]
    allowed: str
    choices: Tuple[str, ...] = ()  # one_of's values; a single one pins a TAO key to what we implement


def one_of(*choices: str, any_case: bool = False) -> Rule:
    allowed = f"{choices[0]} (the only value implemented)" if len(choices) == 1 else "one of " + ", ".join(choices)
    if any_case:
        return Rule(lambda v: str(v).lower() in {c.lower() for c in choices}, allowed, choices)
    return Rule(lambda v: v in choices, allowed, choices)


def at_least(low: float) -> Rule:
    return Rule(lambda v: v >= low, f">= {low}")


def above(low: float) -> Rule:
    return Rule(lambda v: v > low, f"> {low}")


def within(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Rule:
    return Rule(lambda v: (v > low if low_open else v >= low) and (v < high if high_open else v <= high),
                f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}")


def each(inner: Rule, sizes: Sequence[int] = ()) -> Rule:
    """A list whose every element follows `inner` (and whose length is one of `sizes`, when given)."""
    count = f"{' or '.join(map(str, sizes))} " if sizes else ""
    return Rule(lambda v: (not sizes or len(v) in sizes) and all(inner.ok(x) for x in v),
                f"a list of {count}values, each {inner.allowed}")


UNIT = one_of("epoch", "step")
PROBABILITY = within(0, 1)
FRACTION = within(0, 1, high_open=True)  # momentum, dropout: 1 would freeze / drop everything

# (dotted key, rule): applied where the composed config has the key (the schemas differ per model), skipping
# None (an Optional key left unset) and ??? (a mandatory key not given yet).
RULES: List[Tuple[str, Rule]] = [
    # train: both models
    ("train.num_epochs", at_least(1)),
    ("train.checkpoint_interval", at_least(1)),
    ("train.checkpoint_interval_unit", UNIT),
    ("train.validation_interval", at_least(1)),
    ("train.validation_interval_unit", UNIT),
    ("train.precision", one_of("fp32", "fp16", "bf16")),
    ("train.num_gpus", at_least(0)),
    ("train.gpu_ids", each(at_least(0))),
    ("train.num_nodes", at_least(1)),
    ("train.max_time_minutes", above(0)),
    ("train.clip_grad_norm", at_least(0)),
    # train: Grounding DINO's optimizer and schedule (models/gdino/optim.py)
    ("train.optim.optimizer", one_of("AdamW", "SGD", any_case=True)),
    ("train.optim.lr", above(0)),
    ("train.optim.lr_backbone", above(0)),
    ("train.optim.lr_linear_proj_mult", above(0)),
    ("train.optim.momentum", FRACTION),
    ("train.optim.weight_decay", at_least(0)),
    ("train.optim.lr_scheduler", one_of("MultiStep", "cosine", any_case=True)),
    ("train.optim.lr_steps", each(at_least(1))),
    ("train.optim.lr_decay", within(0, 1, low_open=True)),
    ("train.optim.warmup_steps", at_least(0)),
    # train: MAL (engine/mal_module.py, models/mal/criterion.py)
    ("train.batch_size", at_least(1)),
    ("train.accum_grad_batches", at_least(1)),
    ("train.optim_type", one_of("adamw")),
    ("train.lr", above(0)),
    ("train.min_lr", at_least(0)),
    ("train.min_lr_rate", PROBABILITY),
    ("train.wd", at_least(0)),
    ("train.optim_eps", above(0)),
    ("train.optim_betas", each(FRACTION, sizes=(2,))),
    ("train.warmup_epochs", at_least(0)),
    ("train.num_wave", above(0)),
    ("train.margin_rate", each(at_least(0), sizes=(2,))),
    ("train.loss_mil_weight", at_least(0)),
    ("train.loss_crf_weight", at_least(0)),
    ("train.loss_mil_step", at_least(0)),
    ("train.loss_crf_step", at_least(0)),
    ("train.crf_zeta", above(0)),
    ("train.crf_kernel_size", at_least(1)),
    ("train.crf_num_iter", at_least(0)),
    ("train.crf_size_ratio", above(0)),
    ("train.crf_value_low_thres", within(0, 1, low_open=True, high_open=True)),
    ("train.crf_value_high_thres", within(0, 1, low_open=True, high_open=True)),
    # model: TAO keys with the one value we implement
    ("model.two_stage_type", one_of("standard")),
    ("model.position_embedding", one_of("sine")),
    ("model.loss_types", each(one_of("labels", "boxes", "masks"))),
    ("model.num_queries", at_least(1)),
    ("model.num_select", at_least(1)),
    ("model.dropout", FRACTION),
    ("model.fusion_dropout", FRACTION),
    ("model.fusion_droppath", FRACTION),
    ("model.focal_alpha", PROBABILITY),
    ("model.dn_number", at_least(0)),
    ("model.dn_label_noise_ratio", PROBABILITY),
    ("model.dn_box_noise_scale", at_least(0)),
    # model: MAL
    ("model.teacher_momentum", FRACTION),
    ("model.vit_dpr", FRACTION),
    ("model.mask_thres", each(PROBABILITY, sizes=(1, 3))),  # one threshold, or small/medium/large
    ("model.test_margin_rate", each(at_least(0), sizes=(2,))),
    # dataset
    ("dataset.batch_size", at_least(1)),
    ("dataset.workers", at_least(0)),
    ("dataset.num_workers_per_gpu", at_least(0)),
    ("dataset.crop_size", at_least(1)),
    ("dataset.min_obj_size", at_least(0)),
    ("dataset.val_data_sources.data_type", one_of(*SOURCE_DATA_TYPES)),
    ("dataset.test_data_sources.data_type", one_of(*SOURCE_DATA_TYPES)),
    ("dataset.infer_data_sources.data_type", one_of(*SOURCE_DATA_TYPES)),
    # evaluate / inference
    ("evaluate.conf_threshold", PROBABILITY),
    ("evaluate.nms_threshold", PROBABILITY),
    ("evaluate.mask_threshold", PROBABILITY),
    ("evaluate.ioi_threshold", PROBABILITY),
    ("evaluate.text_threshold", PROBABILITY),
    ("evaluate.batch_size", at_least(1)),
    ("evaluate.num_gpus", at_least(0)),
    ("evaluate.gpu_ids", each(at_least(0))),
    ("inference.conf_threshold", PROBABILITY),
    ("inference.text_threshold", PROBABILITY),
    ("inference.nms_threshold", PROBABILITY),
    ("inference.mask_threshold", PROBABILITY),
    ("inference.ioi_threshold", PROBABILITY),
    ("inference.outline_width", at_least(1)),
    ("inference.batch_size", at_least(1)),
    ("inference.draw_images", at_least(-1)),
    ("inference.num_gpus", at_least(0)),
    ("inference.gpu_ids", each(at_least(0))),
    # gen_trt_engine (TensorRT engine building)
    ("gen_trt_engine.tensorrt.data_type", one_of(*DATA_TYPES, any_case=True)),
    ("gen_trt_engine.tensorrt.workspace_size", at_least(1)),
    ("gen_trt_engine.tensorrt.min_batch_size", at_least(1)),
    ("gen_trt_engine.tensorrt.opt_batch_size", at_least(1)),
    ("gen_trt_engine.tensorrt.max_batch_size", at_least(1)),
    ("evaluate.backend", one_of("torch", "onnxruntime", "tensorrt")),
    ("inference.backend", one_of("torch", "onnxruntime", "tensorrt")),
    # export (deploy/onnx_export.py)
    ("export.input_height", at_least(32)),
    ("export.input_width", at_least(32)),
    ("export.batch_size", Rule(lambda v: v == -1 or v >= 1, "-1 (dynamic) or >= 1")),
    ("export.opset_version", at_least(16)),  # GridSample (the deformable attention) is opset 16
    ("export.deform_attn_impl", one_of("grid_sample", "gather_matmul")),  # models/common/ms_deform_attn.TRACED_IMPLS
    # action=autolabel
    ("autolabel.box_source", one_of(*BOX_SOURCES)),
    ("autolabel.box_threshold", PROBABILITY),
    ("autolabel.missing_masks", one_of(*MISSING_MASKS)),
    # action=visualize
    ("action.split", one_of("train", "val", "test")),
    ("action.num_images", at_least(0)),
    ("action.outline_width", at_least(1)),
]

_ABSENT = object()


def _show(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    return repr(value) if isinstance(value, str) else str(value)


def _check_rules(cfg: DictConfig, errors: List[str]) -> None:
    for key, rule in RULES:
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is _ABSENT or value is None:
            continue
        if not rule.ok(value):
            errors.append(f"{key}={_show(value)} must be {rule.allowed}.")
    strategy = OmegaConf.select(cfg, "train.distributed_strategy", default=None)
    if cfg.model.name != "mal" and strategy not in ("ddp", "fsdp"):
        errors.append(f"train.distributed_strategy={strategy!r} must be one of ddp, fsdp.")


def _check_model(cfg: DictConfig, errors: List[str]) -> None:
    m = cfg.model
    if m.name not in MODEL_NAMES:
        errors.append(f"model.name={m.name!r} is not one of {list(MODEL_NAMES)}.")
        return
    if m.name == "mal":
        if cfg.train.distributed_strategy not in ("ddp",):
            errors.append(f"train.distributed_strategy={cfg.train.distributed_strategy!r} must be ddp for model=mal "
                          f"(its EMA teacher pairs the student's parameters one by one, which sharding would split).")
        return
    if m.has_mask != (m.name == "mask_gdino"):
        errors.append(f"model.has_mask={str(m.has_mask).lower()} must be {str(m.name == 'mask_gdino').lower()} "
                      f"with model={m.name} (the mask head comes with model=mask_gdino).")
    if "masks" in m.loss_types and m.name != "mask_gdino":
        errors.append(f"model.loss_types={list(m.loss_types)} has masks, which only model=mask_gdino has.")
    if m.num_region_queries and m.name != "mask_gdino":
        errors.append(f"model.num_region_queries={m.num_region_queries}: region queries (referring segmentation) "
                      f"come with model=mask_gdino.")
    side = int(round(max(m.num_region_queries, 0) ** 0.5))
    if m.num_region_queries < 0 or side * side != m.num_region_queries:
        errors.append(f"model.num_region_queries={m.num_region_queries} must be 0 (no region head) or a perfect "
                      f"square (each region owns one cell of a sqrt(R) x sqrt(R) minimap; TAO uses 100).")
    if m.num_region_queries and m.region_dec_layers < 1:
        errors.append(f"model.region_dec_layers={m.region_dec_layers} must be >= 1 with region queries.")
    if m.name == "mask_gdino":
        if "masks" not in m.loss_types and cfg.action.name == "train":
            errors.append(f"model.loss_types={list(m.loss_types)} lacks masks: model=mask_gdino would train a mask "
                          f"head without a mask loss.")
        if m.num_feature_levels < 3:
            errors.append(f"model.num_feature_levels={m.num_feature_levels}: model=mask_gdino's pixel decoder fuses "
                          f"three levels (strides 8, 16, 32), so it needs at least 3.")
        if m.mask_dim < 1 or m.hidden_dim % 4:
            errors.append(f"model.mask_dim={m.mask_dim} must be >= 1 and model.hidden_dim={m.hidden_dim} divisible "
                          f"by 4 (the pixel decoder narrows hidden_dim to hidden_dim / 4, then to mask_dim).")
    n_interm = len(m.return_interm_indices)
    if m.num_feature_levels < n_interm:
        errors.append(
            f"model.num_feature_levels={m.num_feature_levels} is smaller than the "
            f"{n_interm} backbone levels in model.return_interm_indices={list(m.return_interm_indices)}."
        )
    if any(i < 0 or i > 3 for i in m.return_interm_indices) or sorted(set(m.return_interm_indices)) != list(
        m.return_interm_indices
    ):
        errors.append(
            f"model.return_interm_indices={list(m.return_interm_indices)} must be increasing stage indices in 0..3."
        )
    if m.num_queries < m.num_select:
        errors.append(f"model.num_queries={m.num_queries} must be >= model.num_select={m.num_select}.")
    if m.hidden_dim % m.nheads:
        errors.append(f"model.hidden_dim={m.hidden_dim} must be divisible by model.nheads={m.nheads}.")
    if m.log_scale is not None and m.log_scale != "auto" and not isinstance(m.log_scale, (int, float)):
        errors.append(f"model.log_scale={m.log_scale!r} must be null, auto or a number.")
    if m.max_text_len < 4:
        errors.append(f"model.max_text_len={m.max_text_len} leaves no room for a prompt ([CLS] name . [SEP]).")


def _check_mal_train(cfg: DictConfig, errors: List[str]) -> None:
    if cfg.model.name != "mal":
        return
    t = cfg.train
    if len(t.margin_rate) == 2 and t.margin_rate[0] > t.margin_rate[1]:
        errors.append(f"train.margin_rate={list(t.margin_rate)} must be [low, high] with low <= high.")
    if t.crf_kernel_size % 2 != 1:
        errors.append(f"train.crf_kernel_size={t.crf_kernel_size} must be odd (a window centred on its pixel).")
    if t.crf_value_low_thres >= t.crf_value_high_thres:
        errors.append(f"train.crf_value_low_thres={t.crf_value_low_thres} must be below "
                      f"train.crf_value_high_thres={t.crf_value_high_thres}.")


def _given(node: DictConfig, key: str) -> bool:
    """`key` of `node` holds a value (not empty, not ???)."""
    return bool(OmegaConf.select(node, key, default=None))


def _check_dataset(cfg: DictConfig, errors: List[str]) -> None:
    d, model = cfg.dataset, cfg.model.name
    wanted = MAL_DATASET_TYPES if model == "mal" else DATASET_TYPES
    if d.type not in wanted:
        errors.append(
            f"model={model} reads dataset.type in {list(wanted)}, but dataset.type={d.type!r} "
            f"(choose e.g. dataset={wanted[-1]})."
        )
        return
    # the synthetic datasets generate their own splits: paths given with them would be silently ignored
    keys = (("train_ann_path", "train_img_dir", "val_ann_path", "val_img_dir") if model == "mal" else
            ("train_data_sources", "val_data_sources.json_file", "val_data_sources.image_dir",
             "test_data_sources.json_file", "test_data_sources.image_dir"))
    given = [f"dataset.{k}" for k in keys if d.type in SYNTHETIC_TYPES and _given(d, k)]
    if given:
        real = "dataset=mal_coco" if model == "mal" else "dataset=odvg or dataset=coco"
        errors.append(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} set, but dataset={d.type} generates "
                      f"its own splits and would ignore {'it' if len(given) == 1 else 'them'}: choose {real}.")
    if not 0.0 <= d.max_bad_image_fraction <= 1.0:
        errors.append(f"dataset.max_bad_image_fraction={d.max_bad_image_fraction} must be in [0, 1] (the share of "
                      f"training images that may fail to decode before training stops).")
    if model == "mal":
        if d.min_obj_size > d.max_obj_size:
            errors.append(f"dataset.min_obj_size={d.min_obj_size} exceeds dataset.max_obj_size={d.max_obj_size}.")
        return
    a = d.augmentation
    if a.train_random_crop_min > a.train_random_crop_max:
        errors.append(
            f"dataset.augmentation.train_random_crop_min={a.train_random_crop_min} exceeds "
            f"dataset.augmentation.train_random_crop_max={a.train_random_crop_max}."
        )
    if not a.scales:
        errors.append("dataset.augmentation.scales is empty: training needs at least one resize scale.")
    if not 0.0 <= a.horizontal_flip_prob <= 1.0:
        errors.append(f"dataset.augmentation.horizontal_flip_prob={a.horizontal_flip_prob} is not in [0, 1].")
    if len(a.input_mean) != 3 or len(a.input_std) != 3 or min(a.input_std) <= 0:
        errors.append("dataset.augmentation.input_mean/input_std need 3 values each, std > 0.")
    if a.fixed_input_size is not None and (len(a.fixed_input_size) != 2 or min(a.fixed_input_size) <= 0):
        errors.append(f"dataset.augmentation.fixed_input_size={list(a.fixed_input_size)} must be [height, width].")
    if d.max_labels < 1:
        errors.append(f"dataset.max_labels={d.max_labels} must be >= 1.")
    if d.type in ("odvg", "coco") and cfg.action.name == "train" and not d.train_data_sources:
        errors.append(f"dataset.type={d.type} with action=train needs dataset.train_data_sources.")
    _check_infer_sources(d.infer_data_sources, errors)
    _check_vg(cfg, errors)


def _check_infer_sources(src: DictConfig, errors: List[str]) -> None:
    """One class list (captions or a classmap file) or a caption per image (json_file)."""
    key = "dataset.infer_data_sources"
    if _given(src, "classmap") and _given(src, "captions"):
        errors.append(f"{key}.classmap and {key}.captions are both given: name the classes once, as a classmap "
                      f"file (one class per line) or as a captions list.")
    if _given(src, "classmap") and _given(src, "json_file"):
        errors.append(f"{key}.classmap and {key}.json_file are both given: a classmap is one class list for every "
                      f"image, json_file a caption per image; choose one.")


def _vg_sources(d: DictConfig) -> List[Tuple[str, DictConfig]]:
    """(config key, source) of every data source with data_type=VG, training sources included."""
    out = [(f"dataset.train_data_sources[{i}]", src) for i, src in enumerate(d.train_data_sources or [])
           if src.get("data_type", "OD") == "VG"]
    out += [(f"dataset.{name}_data_sources", d[f"{name}_data_sources"]) for name in ("val", "test", "infer")
            if d[f"{name}_data_sources"].get("data_type", "OD") == "VG"]
    return out


def _check_vg(cfg: DictConfig, errors: List[str]) -> None:
    """data_type=VG (referring expressions) and dataset=synthetic_vg: model=mask_gdino only, annotated VG sources are ODVG .jsonl files, VG inference reads an expression per image
    from infer_data_sources.json_file (dataset=synthetic_vg brings its own)."""
    d = cfg.dataset
    for i, src in enumerate(d.train_data_sources or []):  # a list: out of RULES' reach
        value = src.get("data_type", "OD")
        if value not in SOURCE_DATA_TYPES:
            errors.append(f"dataset.train_data_sources[{i}].data_type={value!r} must be one of "
                          f"{', '.join(SOURCE_DATA_TYPES)}.")
    sources = _vg_sources(d)
    asked = [f"{key}.data_type=VG" for key, _ in sources] + (["dataset=synthetic_vg"] if d.type == "synthetic_vg"
                                                            else [])
    if not asked:
        return
    if cfg.model.name != "mask_gdino":
        errors.append(f"{', '.join(asked)} (referring expressions) needs model=mask_gdino, whose region-query head "
                      f"segments what an expression refers to, not model={cfg.model.name}.")
    for key, src in sources:
        json_file = src.get("json_file") or ""
        if key.endswith("infer_data_sources"):
            if not json_file and d.type != "synthetic_vg":
                errors.append(f"{key}.data_type=VG reads one referring expression per image from {key}.json_file "
                              f'(a jsonl of {{"image_path": ..., "expression": ...}} lines), which is not given.')
            for listed in ("captions", "classmap"):
                if _given(src, listed):
                    errors.append(f"{key}.{listed} is a class list for data_type=OD, but {key}.data_type=VG reads "
                                  f"its expressions from {key}.json_file: drop {key}.{listed}.")
        if json_file and not json_file.endswith(".jsonl"):
            kind = "a .jsonl file" if key.endswith("infer_data_sources") else "an ODVG .jsonl file"
            errors.append(f"{key}.data_type=VG reads referring expressions from {kind}, but "
                          f"{key}.json_file={json_file!r} is not one.")


def _check_gen_trt_engine(cfg: DictConfig, errors: List[str]) -> None:
    """The optimization profile's batch range is ordered (TensorRT rejects min > opt or opt > max at build time,
    after the ONNX file has been parsed; said here at start-up instead)."""
    t = OmegaConf.select(cfg, "gen_trt_engine.tensorrt", default=None)
    if t is None:
        return
    if not t.min_batch_size <= t.opt_batch_size <= t.max_batch_size:
        errors.append(f"gen_trt_engine.tensorrt.min_batch_size={t.min_batch_size}, opt_batch_size={t.opt_batch_size} "
                      f"and max_batch_size={t.max_batch_size} must be ordered min <= opt <= max.")


def _check_synthetic(cfg: DictConfig, errors: List[str]) -> None:
    if cfg.dataset.type not in SYNTHETIC_TYPES:
        return
    s = cfg.dataset.synthetic
    if s.min_objects > s.max_objects:
        errors.append(f"dataset.synthetic.min_objects={s.min_objects} exceeds max_objects={s.max_objects}.")
    if len(s.image_size) != 2 or min(s.image_size) < 16:
        errors.append(f"dataset.synthetic.image_size={list(s.image_size)} must be [height, width], each >= 16.")


CHECKS: List[Callable[[DictConfig, List[str]], None]] = [
    resolve_aliases, _check_rules, _check_model, _check_mal_train, _check_dataset, _check_synthetic,
    _check_gen_trt_engine]


def check_config(cfg: DictConfig) -> None:
    """Resolve TAO's aliases in `cfg` (in place), then raise ConfigError listing every problem of the config:
    one line for one problem, a line per problem under a header for several."""
    errors: List[str] = []
    for check in CHECKS:
        check(cfg, errors)
    if len(errors) == 1:
        raise ConfigError(f"invalid config: {errors[0]}")
    if errors:
        raise ConfigError(f"invalid config, {len(errors)} problems:\n  " + "\n  ".join(errors))
