"""MAL's data module: box crops of the training json (boxes only are enough) and of the validation json
(true masks required, to score), read and checked before training starts."""

from __future__ import annotations

from omegaconf import DictConfig

from groundlab.data.mal_dataset import MALCropDataset, collate_crops
from groundlab.data.mal_sources import mal_paths, read_split
from groundlab.engine.data_base import ResumableDataModule
from groundlab.errors import DataError


class MALDataModule(ResumableDataModule):
    """After `prepare()`: train_data, val_data (MALInstances), train_set, val_set (MALCropDataset)."""

    def __init__(self, cfg: DictConfig):
        super().__init__(cfg.seed)
        self.cfg = cfg
        self.train_data = self.val_data = self.train_set = self.val_set = None

    def prepare(self) -> "MALDataModule":
        c, t = self.cfg, self.cfg.train
        paths = mal_paths(c)
        self.train_data, train_src = read_split(c, paths["train_ann"], paths["train_img"], "train", train=True)
        self.train_set = MALCropDataset(self.train_data, train_src, c.dataset.crop_size, True, t.margin_rate,
                                        c.model.test_margin_rate, seed=c.seed,
                                        max_bad_image_fraction=c.dataset.max_bad_image_fraction)
        if not c.dataset.load_mask:  # TAO: the val json has no masks to score against; train without validation
            return self
        self.val_data, val_src = read_split(c, paths["val_ann"], paths["val_img"], "val", train=False)
        if self.val_data.class_names != self.train_data.class_names:
            raise DataError(f"the val json's categories {self.val_data.class_names} differ from the train json's "
                            f"{self.train_data.class_names}", paths["val_ann"])
        self.val_set = MALCropDataset(self.val_data, val_src, c.dataset.crop_size, False, t.margin_rate,
                                      c.model.test_margin_rate, with_gt=True)
        return self

    def train_dataloader(self):
        return self.loader(self.train_set, self.cfg.train.batch_size, True, self.cfg.dataset.num_workers_per_gpu,
                           collate_crops)

    def val_dataloader(self):
        if self.val_set is None:
            return []
        return self.loader(self.val_set, self.cfg.train.batch_size, False, self.cfg.dataset.num_workers_per_gpu,
                           collate_crops)
