"""Checkpoint files of a training run: `model_epoch_{epoch:03d}_step_{step:05d}.pth` every
`checkpoint_interval` epochs (or steps), and `<model>_model_latest.pth` always pointing at the newest.
Each is written to a temporary file and renamed into place, so a crash never leaves a truncated file;
`latest` is a hard link (no second copy on disk) where the filesystem allows it. Where they are found again
(resume, and the actions that follow a training run): run_dirs.py."""

from __future__ import annotations

import os
import shutil

import lightning as L
from lightning.pytorch.callbacks import Checkpoint

from groundlab.engine.run_dirs import latest_path


class GroundlabCheckpoint(Checkpoint):
    """Saves every `interval` epochs (unit "epoch", after validation) or optimizer steps (unit "step"), and where
    a run stops early. A Checkpoint subclass, so Lightning runs it after its Timer: a `max_time` stop is seen in
    the same batch and saved there, mid-epoch, exactly like a step checkpoint (an epoch cut short is never saved
    as finished, which made the resumed run skip its rest)."""

    def __init__(self, run_dir: str, model_name: str, interval: int = 1, unit: str = "epoch"):
        if unit not in ("epoch", "step"):
            raise ValueError(f"checkpoint_interval_unit={unit!r}: use epoch or step")
        self.run_dir, self.model_name, self.interval, self.unit = run_dir, model_name, max(1, interval), unit
        self._last_saved_step = -1

    def _save(self, trainer: L.Trainer, epoch: int) -> None:
        if trainer.global_step == self._last_saved_step:
            return
        self._last_saved_step = trainer.global_step
        name = f"model_epoch_{epoch:03d}_step_{trainer.global_step:05d}.pth"
        final = os.path.join(self.run_dir, name)
        tmp = final + ".tmp"
        # collective: every rank calls it; rank 0 writes. weights_only=False: the whole training state (optimizer,
        # loops, sampler) for a resume, said explicitly so Lightning does not log that it assumed so
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            os.replace(tmp, final)
            latest = latest_path(self.run_dir, self.model_name)
            link_tmp = latest + ".tmp"
            if os.path.lexists(link_tmp):
                os.remove(link_tmp)
            try:
                os.link(final, link_tmp)
            except OSError:
                shutil.copyfile(final, link_tmp)
            os.replace(link_tmp, latest)

    def on_train_start(self, trainer, pl_module) -> None:
        # a resumed run starts at a saved step: its first batches (mid gradient accumulation) must not save again
        self._last_saved_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.should_stop:  # max_time (the Timer ran just before): keep this exact place in the epoch
            self._save(trainer, trainer.current_epoch)
        elif self.unit == "step" and trainer.global_step > 0 and trainer.global_step % self.interval == 0:
            self._save(trainer, trainer.current_epoch)

    def on_train_end(self, trainer, pl_module) -> None:
        """A run stopped otherwise (e.g. between batches) still leaves its final state."""
        self._save(trainer, trainer.current_epoch)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.current.processed < trainer.num_training_batches:
            return  # cut short (max_time): saved where it stopped, not as a finished epoch
        epoch = trainer.current_epoch + 1  # epochs done
        if self.unit == "epoch" and (epoch % self.interval == 0 or epoch == trainer.max_epochs):
            self._save(trainer, epoch)
        elif self.unit == "step" and epoch == trainer.max_epochs:
            self._save(trainer, epoch)
