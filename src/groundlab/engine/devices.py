"""Where a run computes, from TAO's keys (`num_gpus`, `gpu_ids`, `num_nodes`, `distributed_strategy`): the
Lightning accelerator / devices / strategy of a training run, and the one device of an evaluate or
inference run.

Processes of a training run: `train.num_gpus` per node x `train.num_nodes`. Without CUDA, `num_gpus=N` (N > 1)
means N CPU processes under Lightning DDP over gloo (logged once); `num_gpus` 0 or 1 means one CPU process.
Several processes: DDP (find_unused_parameters from the Lightning module's `ddp_find_unused_parameters`: on,
as TAO for MAL; see module_base.py) or FSDP (`train.distributed_strategy=fsdp`, GPUs only: Lightning refuses FSDP on the CPU).

Launch contract (read from the environment, so every node runs the same command):
- `MASTER_ADDR`, `MASTER_PORT`: the rank-0 node's address and a free port on it (Lightning reads them).
- `NODE_RANK`: this node's index, 0 .. num_nodes-1 (Lightning reads it).
- `WORLD_SIZE` with `NUM_GPU_PER_NODE`, TAO's launcher contract: in a process no launcher started (no
  `LOCAL_RANK`), `WORLD_SIZE` is the number of NODES and replaces `train.num_nodes`, and `NUM_GPU_PER_NODE`
  (when set) replaces `train.num_gpus`; logged. In a process a launcher started (`LOCAL_RANK` set: Lightning's
  own ranks, torchrun), `WORLD_SIZE` counts processes: processes per node = `LOCAL_WORLD_SIZE` (torchrun) or
  `NUM_GPU_PER_NODE` or `train.num_gpus`, nodes = `WORLD_SIZE` / that.
- SLURM (`srun`, Lightning's SLURMEnvironment): one task per process; `train.num_nodes` and `train.num_gpus`
  must equal `--nodes` and `--ntasks-per-node` (Lightning checks them and says which differs).
"""

from __future__ import annotations

import logging
import os
from typing import List, Mapping, Optional, Tuple, Union

import torch
from omegaconf import DictConfig

from groundlab.config import ConfigError

log = logging.getLogger(__name__)

PRECISION = {"fp32": "32-true", "fp16": "16-mixed", "bf16": "bf16-mixed"}


def _cuda(num_gpus: int) -> bool:
    return torch.cuda.is_available() and num_gpus > 0


def launch_counts(train: DictConfig, env: Optional[Mapping[str, str]] = None) -> Tuple[int, int]:
    """(processes per node as train.num_gpus says it, nodes) after the launch environment (module docstring)."""
    env = os.environ if env is None else env
    per_node, nodes = int(train.num_gpus), int(train.num_nodes)
    if not env.get("WORLD_SIZE"):
        return per_node, nodes
    world = int(env["WORLD_SIZE"])
    if "LOCAL_RANK" in env:  # started by a launcher: WORLD_SIZE counts processes
        per_node = int(env.get("LOCAL_WORLD_SIZE") or env.get("NUM_GPU_PER_NODE") or per_node)
        return per_node, max(1, world // max(1, per_node))
    # TAO's launcher contract: WORLD_SIZE nodes of NUM_GPU_PER_NODE devices
    tao_per_node = int(env.get("NUM_GPU_PER_NODE") or per_node)
    if (tao_per_node, world) != (per_node, nodes):
        log.info("WORLD_SIZE=%d nodes, %d processes per node (NUM_GPU_PER_NODE, TAO's launch contract) replace "
                 "train.num_nodes=%d, train.num_gpus=%d", world, tao_per_node, nodes, per_node)
    return tao_per_node, world


def _first_process() -> bool:
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def _devices(train: DictConfig) -> Tuple[str, Union[int, List[int]], int]:
    """(accelerator, devices per node, nodes)."""
    per_node, nodes = launch_counts(train)
    if not _cuda(per_node):
        return "cpu", max(1, per_node), nodes  # CPU processes: gpu_ids name GPUs, so they do not apply
    # gpu_ids picks the devices when it names enough of them (TAO's default [0] with num_gpus=2 means 2 GPUs)
    ids = list(train.gpu_ids or [])
    return "gpu", (ids[:per_node] if len(ids) >= per_node else per_node), nodes


def trainer_devices(train: DictConfig, find_unused_parameters: bool = True
                    ) -> Tuple[str, Union[int, List[int]], int, object]:
    """(accelerator, devices per node, num_nodes, strategy) for L.Trainer, after the launch environment (so TAO's
    WORLD_SIZE nodes reach the Trainer too). find_unused_parameters: DDP's (the module's
    `ddp_find_unused_parameters`)."""
    accelerator, devices, nodes = _devices(train)
    n = len(devices) if isinstance(devices, list) else devices
    if n * nodes == 1:
        return accelerator, devices, nodes, "auto"
    if train.distributed_strategy == "fsdp":
        if accelerator == "cpu":
            raise ConfigError(f"train.distributed_strategy=fsdp needs GPUs and no CUDA device is here (Lightning "
                              f"shards with FSDP on CUDA devices only): use ddp for {n * nodes} CPU processes.")
        from lightning.pytorch.strategies import FSDPStrategy

        return accelerator, devices, nodes, FSDPStrategy()
    from lightning.pytorch.strategies import DDPStrategy

    if accelerator == "cpu" and _first_process():
        log.info("no CUDA device: train.num_gpus=%d runs %d CPU processes per node x %d node(s), DDP over gloo",
                 train.num_gpus, n, nodes)
    return accelerator, devices, nodes, DDPStrategy(find_unused_parameters=find_unused_parameters,
                                                    process_group_backend="gloo" if accelerator == "cpu" else None)


def process_count(train: DictConfig) -> int:
    """Training processes over all nodes (MAL scales its lr by it)."""
    _, devices, nodes = _devices(train)
    return (len(devices) if isinstance(devices, list) else int(devices)) * nodes


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
