"""Typed schemas of the `action` group and of the per-model action settings (`train`, `evaluate`,
`inference`, `export`), keyed as TAO's specs (`train.num_epochs`, `train.optim.lr`, `evaluate.conf_threshold`).

The `action` group picks what runs (`action=train`); the `train`/`evaluate`/`inference` groups hold
that action's settings for the chosen model (selected by `${model}` in conf/config.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional


@dataclass
class ActionConfig:
    """Which action runs. Actions with settings of their own extend this."""

    name: str = "train"


@dataclass
class VisualizeActionConfig(ActionConfig):
    """Draw a dataset's ground truth (boxes, masks, prompt) through the real data pipeline."""

    name: str = "visualize"
    split: str = "train"  # train | val
    num_images: int = 8
    augment: bool = False  # True: show the training transforms' output instead of the raw image
    outline_width: int = 2


@dataclass
class OptimConfig:
    optimizer: str = "AdamW"  # AdamW | SGD
    lr: float = 2e-4
    lr_backbone: float = 2e-5
    lr_linear_proj_mult: float = 0.1
    momentum: float = 0.9  # SGD only
    weight_decay: float = 1e-4
    lr_scheduler: str = "MultiStep"  # MultiStep | cosine
    lr_steps: List[int] = field(default_factory=lambda: [11])
    lr_decay: float = 0.1
    warmup_steps: int = 0


@dataclass
class GDinoTrainConfig:
    num_epochs: int = 12
    max_time_minutes: Optional[float] = None  # stop after this wall time (a checkpoint is written at the stop)
    num_gpus: int = 1
    gpu_ids: List[int] = field(default_factory=lambda: [0])
    num_nodes: int = 1
    checkpoint_interval: int = 1
    checkpoint_interval_unit: str = "epoch"  # epoch | step
    validation_interval: int = 1
    validation_interval_unit: str = "epoch"
    pretrained_model_path: Optional[str] = None
    resume_training_checkpoint_path: Optional[str] = None
    clip_grad_norm: float = 0.1
    precision: str = "fp32"  # fp32 | fp16 | bf16
    distributed_strategy: str = "ddp"  # ddp | fsdp
    activation_checkpoint: bool = False
    freeze: List[str] = field(default_factory=list)  # parameter-name prefixes to freeze, e.g. [backbone, bert]
    is_dry_run: bool = False
    wandb: bool = False  # also log to Weights & Biases (needs `pip install wandb` and a login)
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class MALTrainConfig:
    """TAO `mal` train keys; the lr is per image and per device (scaled by devices x batch_size)."""

    num_epochs: int = 10
    num_gpus: int = 1
    gpu_ids: List[int] = field(default_factory=lambda: [0])
    num_nodes: int = 1
    distributed_strategy: str = "ddp"  # ddp only (the EMA teacher pairs parameters one by one)
    checkpoint_interval: int = 1
    checkpoint_interval_unit: str = "epoch"  # epoch | step
    validation_interval: int = 1
    validation_interval_unit: str = "epoch"  # epoch | step
    # TAO's older names (groundlab.config.aliases): copied onto the canonical key at start-up
    save_every_k_epoch: Optional[int] = None  # alias of train.checkpoint_interval
    val_interval: Optional[int] = None  # alias of train.validation_interval
    test_margin_rate: Optional[List[float]] = None  # alias of model.test_margin_rate
    mask_thres: Optional[List[float]] = None  # alias of model.mask_thres
    batch_size: int = 3
    accum_grad_batches: int = 1
    use_amp: bool = True  # TAO: fp16 autocast on a GPU; train.precision overrides it when not fp32
    precision: str = "fp32"  # fp32 | fp16 | bf16
    max_time_minutes: Optional[float] = None
    clip_grad_norm: float = 0.0
    pretrained_model_path: Optional[str] = None
    resume_training_checkpoint_path: Optional[str] = None
    activation_checkpoint: bool = False
    # optimizer and schedule
    optim_type: str = "adamw"  # adamw only
    lr: float = 1e-6
    min_lr: float = 0.0
    min_lr_rate: float = 0.2
    num_wave: float = 1.0
    wd: float = 0.0005
    optim_eps: float = 1e-8
    optim_betas: List[float] = field(default_factory=lambda: [0.9, 0.9])
    warmup_epochs: float = 1.0
    # training crops: the box grown by a random margin rate in [lo, hi] per axis
    margin_rate: List[float] = field(default_factory=lambda: [0.0, 1.2])
    # losses
    loss_mil_weight: float = 4.0
    loss_crf_weight: float = 0.5
    loss_mil_step: int = 1000
    loss_crf_step: int = 4000
    # mean-field CRF
    crf_zeta: float = 0.1
    crf_kernel_size: int = 3
    crf_num_iter: int = 100
    crf_size_ratio: int = 1
    crf_value_high_thres: float = 0.9
    crf_value_low_thres: float = 0.1


@dataclass
class GDinoEvaluateConfig:
    """Grounding DINO and Mask Grounding DINO (one schema: mask_threshold is read only where the checkpoint has a
    mask head; a box-only predictor ignores it). The network runs from one of checkpoint / onnx_file / trt_engine
    (predict/backends.py): `backend` picks among several given, else the one given decides; none given: the latest
    checkpoint of the train run with the same model and run_name (engine/run_dirs.py)."""

    checkpoint: Optional[str] = None
    onnx_file: Optional[str] = None  # an exported graph (action=export), run with ONNX Runtime
    trt_engine: Optional[str] = None  # a TensorRT engine (TAO's key)
    backend: Optional[str] = None  # torch | onnxruntime | tensorrt; None: the one file given decides
    conf_threshold: float = 0.0
    nms_threshold: Optional[float] = None  # class-wise box NMS IoU over the merged detections; None: no NMS
    mask_threshold: float = 0.5  # mask models: a pixel is in the instance when its mask probability is >= this
    # referring segmentation (a data_type VG source): an instance is kept when this fraction of it lies in the
    # predicted union mask; its label is the expression's words whose tokens score above text_threshold
    ioi_threshold: float = 0.5
    text_threshold: float = 0.3
    num_gpus: int = 1
    gpu_ids: List[int] = field(default_factory=lambda: [0])


@dataclass
class MALEvaluateConfig:
    checkpoint: Optional[str] = None  # None: the latest of the train run with the same model and run_name
    batch_size: int = 3
    num_gpus: int = 1
    gpu_ids: List[int] = field(default_factory=lambda: [0])
    use_mixed_model_test: bool = False
    use_teacher_test: bool = False
    use_flip_test: bool = False


@dataclass
class GDinoInferenceConfig:
    """Grounding DINO and Mask Grounding DINO (mask_threshold and the backend keys as in GDinoEvaluateConfig)."""

    checkpoint: Optional[str] = None
    onnx_file: Optional[str] = None
    trt_engine: Optional[str] = None
    backend: Optional[str] = None
    conf_threshold: float = 0.5
    text_threshold: float = 0.25
    nms_threshold: Optional[float] = None
    mask_threshold: float = 0.5
    ioi_threshold: float = 0.5  # referring segmentation (data_type VG): as evaluate.ioi_threshold
    color_map: Dict[str, str] = field(default_factory=dict)
    outline_width: int = 3
    num_gpus: int = 1
    gpu_ids: List[int] = field(default_factory=lambda: [0])


@dataclass
class GDinoExportConfig:
    """TAO's `export` keys for Grounding DINO and Mask Grounding DINO (deploy/onnx_export.py, actions/export.py)."""

    checkpoint: Optional[str] = None  # None: the latest of the train run with the same model and run_name
    onnx_file: Optional[str] = None  # None: <results_dir>/<model>.onnx
    input_height: int = 544
    input_width: int = 960
    batch_size: int = -1  # -1: dynamic batch
    opset_version: int = 17
    split_text_encoder: bool = False  # also <name>.text.onnx (tokens -> text features) and <name>.image.onnx
    # a symbolic text length (1..max_text_len) instead of TAO's fixed max_text_len: ONNX Runtime then runs only the
    # prompt's tokens (faster on the CPU); TensorRT engines and DeepStream take the fixed length (the default)
    dynamic_text_len: bool = False
    # deformable attention's sampling in the graph: grid_sample (GridSample: TensorRT's and TAO's) | gather_matmul
    # (Gather + MatMul, ~1.8x faster in ONNX Runtime on the CPU)
    deform_attn_impl: str = "grid_sample"
    simplify: bool = False  # onnxslim the graphs (needs `pip install onnxslim`)
    verbose: bool = False  # torch.onnx.export's verbose listing of the graph


@dataclass
class MALInferenceConfig:
    checkpoint: Optional[str] = None  # None: the latest of the train run with the same model and run_name
    ann_path: str = ""
    img_dir: str = ""
    label_dump_path: str = ""
    load_mask: bool = False  # the json has masks: score the predictions against them (mIoU, `mal_iou` per box)
    batch_size: int = 3
    use_mixed_model_test: bool = False
    use_teacher_test: bool = False
    use_flip_test: bool = False
    draw_images: int = 20  # annotated images written next to the json (0: none, -1: all)
    num_gpus: int = 1
    gpu_ids: List[int] = field(default_factory=lambda: [0])
