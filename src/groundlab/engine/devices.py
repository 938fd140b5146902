"""Where a run computes, from TAO's keys (`num_gpus`, `gpu_ids`, `num_nodes`, `distributed_strategy`): the
Lightning accelerator / devices / strategy of a training run, and the one device of an evaluate or
inference run. CPU whenever CUDA is absent or num_gpus is 0."""

from __future__ import annotations

from typing import List, Tuple, Union

import torch
from omegaconf import DictConfig

PRECISION = {"fp32": "32-true", "fp16": "16-mixed", "bf16": "bf16-mixed"}


def _cuda(num_gpus: int) -> bool:
    return torch.cuda.is_available() and num_gpus > 0


def trainer_devices(train: DictConfig) -> Tuple[str, Union[int, List[int]], object]:
    """(accelerator, devices, strategy) for L.Trainer. Several processes: DDP (find_unused_parameters off:
    every model keeps its parameters in the graph) or FSDP (train.distributed_strategy=fsdp)."""
    if not _cuda(train.num_gpus):
        return "cpu", 1, "auto"
    # gpu_ids picks the devices when it names enough of them (TAO's default [0] with num_gpus=2 means 2 GPUs)
    ids = list(train.gpu_ids or [])
    devices = ids[: train.num_gpus] if len(ids) >= train.num_gpus else train.num_gpus
    n = len(devices) if isinstance(devices, list) else devices
    if n * train.num_nodes == 1:
        return "gpu", devices, "auto"
    if train.distributed_strategy == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        return "gpu", devices, FSDPStrategy()
    from lightning.pytorch.strategies import DDPStrategy

    return "gpu", devices, DDPStrategy(find_unused_parameters=False)


def process_count(train: DictConfig) -> int:
    """Training processes over all nodes (MAL scales its lr by it)."""
    _, devices, _ = trainer_devices(train)
    return (len(devices) if isinstance(devices, list) else int(devices)) * int(train.num_nodes)


def run_device(num_gpus: int, gpu_ids=None) -> torch.device:
    """The device of an evaluate / inference run: cuda:<gpu_ids[0]> (cuda:0 without ids), else the CPU."""
    if not _cuda(num_gpus):
        return torch.device("cpu")
    return torch.device(f"cuda:{int(gpu_ids[0]) if gpu_ids else 0}")


def trainer_precision(train: DictConfig) -> str:
    """Lightning's precision of train.precision; TAO MAL's `use_amp` (when the schema has it) means fp16 autocast
    on a GPU when train.precision is left at fp32."""
    if train.precision == "fp32" and train.get("use_amp") and torch.cuda.is_available():
        return PRECISION["fp16"]
    return PRECISION[train.precision]
