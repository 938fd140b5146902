"""Distributed training proven on CPU processes (Lightning DDP over gloo, real processes, no mocks): with no GPU,
`train.num_gpus=2` trains two processes for gdino, mask_gdino and mal; each rank draws its own half of the
epoch (tests/ddp_probe.py records what ResumableSampler handed each rank), validation gathers every rank's
predictions (the 2-process metrics equal one process validating the same final weights), checkpoints are written
once (by rank 0); a 2-process run killed with SIGKILL resumes with the same command and ends with the weights of
a run never interrupted; two "nodes" (NODE_RANK 0/1, one MASTER_ADDR/PORT) train together; the launch
environment's counts (TAO's WORLD_SIZE / NUM_GPU_PER_NODE, a launcher's ranks); FSDP on the CPU is one
sentence; bf16 trains and validates every model; fp16 with its grad scaler on a GPU."""

from __future__ import annotations

import csv
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, TINY_GDINO

DATA = ["dataset.synthetic.num_train=8", "dataset.synthetic.num_val=5", "dataset.synthetic.image_size=[64,64]",
        "dataset.workers=0", "dataset.batch_size=2", "dataset.augmentation.scales=[64]",
        "dataset.augmentation.test_random_resize=64", "dataset.augmentation.train_random_resize=[64]",
        "dataset.augmentation.train_random_crop_min=48", "dataset.augmentation.train_random_crop_max=64"]
# 8 training samples over 2 ranks x batch 2: 2 steps an epoch; 5 validation images: 3 on rank 0, 2 on rank 1
MODELS = {
    "gdino": ["experiment=quickstart", *TINY_GDINO, *DATA, "train.max_time_minutes=null"],
    "mask_gdino": ["experiment=mgd_quickstart", *TINY_GDINO, *DATA, "train.max_time_minutes=null"],
    # the session's trained quickstart models (conftest.trained), fine-tuned: validation then finds objects, so
    # the 2-process metrics agreeing with one process's says the ranks' predictions were gathered
    "gdino_trained": ["experiment=quickstart", *DATA, "train.max_time_minutes=null"],
    "mask_gdino_trained": ["experiment=mgd_quickstart", *DATA, "train.max_time_minutes=null"],
    "mal": ["experiment=mal_quickstart", "train.max_time_minutes=null",
            "model.vit_overrides={hidden_size:64,num_hidden_layers:2,num_attention_heads:2,intermediate_size:128}",
            "model.mask_head_hidden_channel=32", "model.mask_head_out_channel=32", "dataset.crop_size=64",
            "dataset.synthetic.num_train=4", "dataset.synthetic.num_val=3", "dataset.synthetic.image_size=[96,96]",
            "train.batch_size=2"],
}
VAL_KEYS = {"gdino": ("val_mAP", "val_mAP50"), "mask_gdino": ("val_mAP", "val_mAP50", "segm_val_mAP", "segm_val_mAP50"),
            "mal": ("val_mIoU",)}
VAL_KEYS.update(gdino_trained=VAL_KEYS["gdino"], mask_gdino_trained=VAL_KEYS["mask_gdino"])
EXPERIMENT = {"gdino_trained": "quickstart", "mask_gdino_trained": "mgd_quickstart"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(model: str, run_dir, *extra: str, probe: bool = True):
    script = REPO / "tests" / "ddp_probe.py" if probe else REPO / "run.py"
    return [sys.executable, str(script), *MODELS[model], *extra, f"hydra.run.dir={run_dir}"]


def _env(tmp_path, **extra):
    (tmp_path / "draws").mkdir(exist_ok=True)
    return dict(os.environ, PYTHONUNBUFFERED="1", DDP_PROBE_DIR=str(tmp_path / "draws"), MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(_free_port()), **extra)


def _run(cmd, env, timeout=300):
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _draws(tmp_path):
    """{(rank, epoch): indices} of every training epoch each rank started."""
    out = {}
    for path in glob.glob(str(tmp_path / "draws" / "*.jsonl")):
        for line in open(path):
            d = json.loads(line)
            out.setdefault((d["rank"], d["epoch"]), []).append(d["indices"])
    return out


def _last_val(run_dir, keys):
    rows = [r for r in csv.DictReader(open(run_dir / "logs" / "metrics.csv")) if r.get(keys[0])]
    return {k: float(rows[-1][k]) for k in keys}


def _validate_in_one_process(compose, model, ckpt, run_dir):
    """The metrics of one process validating checkpoint `ckpt` through the same Lightning module."""
    import lightning as L

    cfg = compose(MODELS[model], results_dir=str(run_dir / "single"))
    if model == "mal":
        from groundlab.engine.mal_data import MALDataModule
        from groundlab.engine.mal_module import MALLightning

        dm = MALDataModule(cfg).prepare()
        module = MALLightning(cfg, dm.train_data.class_names, dm.train_data.category_ids)
    else:
        from groundlab.engine.gdino_data import GroundingDataModule
        from groundlab.engine.gdino_module import GDinoLightning

        dm = GroundingDataModule(cfg).prepare()
        module = GDinoLightning(cfg, dm)
    L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False).validate(
        module, datamodule=dm, ckpt_path=str(ckpt), weights_only=True, verbose=False)
    return module.last_metrics


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gdino_trained", "mask_gdino_trained", "mal"])
def test_two_cpu_processes_train_shard_gather_and_checkpoint_once(compose, trained, model, tmp_path):
    run_dir = tmp_path / "run"
    start = []
    if model in EXPERIMENT:
        model_runs, _ = trained(EXPERIMENT[model])
        start = [f"train.pretrained_model_path={model_runs / 'train' / EXPERIMENT[model]}/{model_runs.name}_model_latest.pth"]
    out = _run(_cmd(model, run_dir, "train.num_gpus=2", "train.num_epochs=1", *start), _env(tmp_path))
    assert "runs 2 CPU processes per node x 1 node(s), DDP over gloo" in out
    # each rank drew its own half of the epoch, together all of it
    draws = _draws(tmp_path)
    assert sorted(draws) == [(0, 0), (1, 0)], draws
    rank0, rank1 = draws[(0, 0)][0], draws[(1, 0)][0]
    n_train = len(rank0) + len(rank1)
    assert not set(rank0) & set(rank1) and sorted(rank0 + rank1) == list(range(n_train))
    # one set of checkpoint files, written by rank 0 (a rank writing its own would leave a second step or a .tmp)
    name = model.replace("_trained", "")
    names = sorted(os.path.basename(p) for p in glob.glob(str(run_dir / "*.pth*")))
    steps = -(-len(rank0) // 2)  # batch 2 on each rank
    assert names == [f"{name}_model_latest.pth", f"model_epoch_001_step_{steps:05d}.pth"], names
    ckpt = torch.load(run_dir / f"{name}_model_latest.pth", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == steps
    info = json.loads((run_dir / "run_info.json").read_text())
    assert not any("train_ddp_process" in a for a in info["command"])  # the record is the user's command
    # validation gathered both ranks' predictions: one process validating the final weights agrees
    two = _last_val(run_dir, VAL_KEYS[model])
    assert two[VAL_KEYS[model][-1]] > 0.01, two  # something to gather: a model that finds objects
    one = _validate_in_one_process(compose, model, run_dir / f"{name}_model_latest.pth", tmp_path)
    assert two == pytest.approx({k: one[k] for k in two}, abs=1e-6), (two, one)


# 2 epochs of 2 steps, a checkpoint every step
RESUMED = ("train.num_epochs=2", "train.checkpoint_interval=1", "train.checkpoint_interval_unit=step")


@pytest.fixture
def two_nodes(tmp_path):
    """Two run.py processes, one per "node" (train.num_nodes=2, train.num_gpus=1, NODE_RANK 0 / 1, the same
    MASTER_ADDR / MASTER_PORT) training 2 epochs: (run dir of node 0, of node 1, {(rank, epoch): draws})."""
    tmp = tmp_path
    env = _env(tmp)
    procs = [subprocess.Popen(_cmd("gdino", tmp / f"node{r}", "train.num_nodes=2", "train.num_gpus=1", *RESUMED),
                              cwd=REPO, env=dict(env, NODE_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    return tmp / "node0", tmp / "node1", _draws(tmp)


@pytest.mark.slow
def test_two_nodes_train_together(two_nodes):
    """One process group of 2 over the two "nodes": it shards each epoch and trains in step; node 0 checkpoints."""
    node0, node1, draws = two_nodes
    assert sorted(draws) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert not set(draws[(0, 0)][0]) & set(draws[(1, 0)][0])
    assert glob.glob(str(node0 / "model_epoch_*.pth")) and not glob.glob(str(node1 / "*.pth"))
    ckpt = torch.load(node0 / "gdino_model_latest.pth", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4  # 8 samples / 2 ranks / batch 2, 2 epochs


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_where_it_stopped(tmp_path):
    """SIGKILL to both ranks of a 2-process run after its step-2 checkpoint; the same command resumes and ends with
    the weights of the same run uninterrupted. (Not the two nodes' run: over TCP between two process trees gloo
    sums the gradients in another order, ~1e-5 apart after 4 steps.)"""
    extra = ("train.num_gpus=2", *RESUMED)
    whole = tmp_path / "whole"
    _run(_cmd("gdino", whole, *extra, probe=False), _env(tmp_path))
    run_dir = tmp_path / "killed"
    first = subprocess.Popen(_cmd("gdino", run_dir, *extra, probe=False), cwd=REPO, env=_env(tmp_path),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 240
    while not glob.glob(str(run_dir / "model_epoch_*_step_00002.pth")) and time.time() < deadline:
        if first.poll() is not None:
            pytest.fail("training ended before it could be killed:\n" + first.stdout.read().decode()[-3000:])
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # both ranks (rank 1 is rank 0's child, in its session)
    first.wait()
    killed_at = torch.load(run_dir / "gdino_model_latest.pth", map_location="cpu", weights_only=True)["global_step"]
    assert 2 <= killed_at < 4
    out = _run(_cmd("gdino", run_dir, *extra, probe=False), _env(tmp_path))
    assert "resuming from" in out
    a = torch.load(whole / "gdino_model_latest.pth", map_location="cpu", weights_only=True)
    b = torch.load(run_dir / "gdino_model_latest.pth", map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == 4
    for key, value in a["state_dict"].items():
        assert torch.allclose(value.float(), b["state_dict"][key].float(), atol=1e-6), key


def test_launch_environment_sets_the_process_counts():
    from omegaconf import OmegaConf

    from groundlab.engine.devices import launch_counts

    train = OmegaConf.create({"num_gpus": 1, "num_nodes": 1})
    assert launch_counts(train, {}) == (1, 1)
    # TAO's launcher contract: WORLD_SIZE counts nodes, NUM_GPU_PER_NODE devices per node
    assert launch_counts(train, {"WORLD_SIZE": "3", "NUM_GPU_PER_NODE": "4", "NODE_RANK": "1"}) == (4, 3)
    assert launch_counts(OmegaConf.create({"num_gpus": 2, "num_nodes": 1}), {"WORLD_SIZE": "2"}) == (2, 2)
    # a process a launcher started (Lightning's other ranks, torchrun): WORLD_SIZE counts processes
    assert launch_counts(train, {"WORLD_SIZE": "12", "LOCAL_RANK": "1", "NUM_GPU_PER_NODE": "4"}) == (4, 3)
    assert launch_counts(train, {"WORLD_SIZE": "8", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}) == (2, 4)
    assert launch_counts(OmegaConf.create({"num_gpus": 2, "num_nodes": 1}), {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == (2, 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: FSDP is allowed there")
def test_fsdp_on_cpu_processes_is_one_sentence(compose):
    from groundlab.config import ConfigError
    from groundlab.engine.devices import trainer_devices

    cfg = compose(["train.num_gpus=2", "train.distributed_strategy=fsdp"])
    with pytest.raises(ConfigError, match="train.distributed_strategy=fsdp needs GPUs"):
        trainer_devices(cfg.train)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mask_gdino", "mal"])
def test_bf16_trains_and_validates(model, tmp_path):
    """train.precision=bf16 (CPU autocast) for the models tests/test_gdino_train.py does not cover: finite losses,
    weights that moved, a validation, fp32 weights in the checkpoint. In its own process (see test_gdino_train)."""
    _run(_cmd(model, tmp_path / "run", "train.num_epochs=1", "train.precision=bf16", "train.checkpoint_interval=1",
              "train.checkpoint_interval_unit=step", probe=False), _env(tmp_path))
    rows = list(csv.DictReader(open(tmp_path / "run" / "logs" / "metrics.csv")))
    losses = [float(r["train_loss"]) for r in rows if r.get("train_loss")]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    val = _last_val(tmp_path / "run", VAL_KEYS[model])
    assert all(0.0 <= v <= 1.0 for v in val.values())
    a = torch.load(tmp_path / "run" / f"{model}_model_latest.pth", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "run" / "model_epoch_000_step_00001.pth", map_location="cpu", weights_only=True)
    assert a["global_step"] >= 2
    assert {v.dtype for v in a["state_dict"].values() if v.is_floating_point()} == {torch.float32}
    assert any(not torch.equal(v, b["state_dict"][k]) for k, v in a["state_dict"].items() if v.is_floating_point())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 with its grad scaler needs CUDA")
def test_fp16_with_grad_scaler_trains_on_a_gpu(tmp_path):
    run_dir = tmp_path / "run"
    _run(_cmd("gdino", run_dir, "train.num_epochs=1", "train.precision=fp16", "train.num_gpus=1", probe=False),
         _env(tmp_path))
    ckpt = torch.load(run_dir / "gdino_model_latest.pth", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] > 0 and "native_amp_scaling_state" in ckpt  # the scaler's state, for a resume
    assert {v.dtype for v in ckpt["state_dict"].values() if v.is_floating_point()} == {torch.float32}
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_taos_world_size_reaches_the_trainer(compose, monkeypatch):
    """TAO's launcher contract (WORLD_SIZE nodes of NUM_GPU_PER_NODE processes) sets the Trainer's num_nodes, not
    only the counts: a node of a 2-node run built a 1-node world before."""
    from lightning.pytorch.strategies import DDPStrategy

    from groundlab.engine.devices import trainer_devices

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("NUM_GPU_PER_NODE", "1")
    accelerator, devices, nodes, strategy = trainer_devices(compose([]).train)
    assert (accelerator if not torch.cuda.is_available() else "cpu", devices, nodes) == ("cpu", 1, 2)
    assert isinstance(strategy, DDPStrategy)
