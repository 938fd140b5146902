"""The MAL predictor, with the Grounding DINO predictor's interface (`from_model`, `from_checkpoint`, a device,
the checkpoint's class names and config, one call per batch): mask logits of box crops from the student, the
teacher or their average (TAO `use_teacher_test` / `use_mixed_model_test`), optionally averaged with the
mirrored crop (`use_flip_test`), then pasted back into the image and thresholded (`model.mask_thres`)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from groundlab.models.mal.build import load_mal_network
from groundlab.models.mal.network import MALNetwork
from groundlab.models.mal.postprocess import MALPostProcessor

Mask = Tuple[torch.Tensor, Tuple[int, int, int, int]]  # (region bool mask, (x1, y1, x2, y2) its place)


class MALPredictor:
    """student / teacher: MALNetworks (the teacher only when use_teacher or mixed); crop_size: the square crops the
    networks were built for; class_names / category_ids: of the checkpoint's training json."""

    def __init__(self, student: MALNetwork, teacher: Optional[MALNetwork] = None, use_teacher: bool = False,
                 mixed: bool = False, flip: bool = False, mask_thres: Sequence[float] = (0.1,),
                 device: torch.device = torch.device("cpu"), crop_size: Optional[int] = None,
                 class_names: Optional[List[str]] = None, category_ids: Optional[List[int]] = None,
                 config: Optional[Dict[str, Any]] = None):
        if (use_teacher or mixed) and teacher is None:
            raise ValueError("use_teacher_test / use_mixed_model_test need the teacher's weights")
        self.nets = nn.ModuleList([teacher, student] if mixed else [teacher if use_teacher else student])
        self.flip, self.device = flip, torch.device(device)
        self.post = MALPostProcessor(mask_thres)
        self.crop_size, self.class_names, self.category_ids, self.config = crop_size, class_names, category_ids, config

    @classmethod
    def from_model(cls, student: MALNetwork, mask_thres: Sequence[float], device: torch.device) -> "MALPredictor":
        """Around a student in memory (validation during training)."""
        return cls(student, mask_thres=mask_thres, device=device)

    @classmethod
    def from_checkpoint(cls, checkpoint: str, mask_thres: Sequence[float], device: torch.device,
                        use_teacher: bool = False, mixed: bool = False, flip: bool = False) -> "MALPredictor":
        """A groundlab MAL checkpoint (its structure, crop size and class names come with it); ValueError /
        FileNotFoundError name the file."""
        student, ckpt = load_mal_network(checkpoint, "student")
        teacher = load_mal_network(checkpoint, "teacher")[0].to(device) if use_teacher or mixed else None
        return cls(student.to(device), teacher, use_teacher, mixed, flip, mask_thres, device, int(ckpt["crop_size"]),
                   ckpt.get("class_names"), ckpt.get("category_ids"), ckpt.get("model_config"))

    def _once(self, images: torch.Tensor, areas: torch.Tensor) -> torch.Tensor:
        return torch.stack([net(images, areas).float() for net in self.nets]).mean(0)

    @torch.no_grad()
    def logits(self, images: torch.Tensor, areas: torch.Tensor) -> torch.Tensor:
        """images (N, 3, S, S) crops, areas (N,) box areas in image pixels -> (N, 1, S/4, S/4) mask logits."""
        images, areas = images.to(self.device), areas.to(self.device)
        out = self._once(images, areas)
        if self.flip:
            out = (out + self._once(images.flip(-1), areas).flip(-1)) / 2
        return out

    def __call__(self, batch: Dict[str, Any]) -> List[Mask]:
        """A MALCropDataset batch ("teacher" crops, "area", "ext", "box", "size") -> per box its binary mask in
        image coordinates."""
        logits = self.logits(batch["teacher"], batch["area"])
        return self.post(logits, batch["ext"], batch["box"], batch["size"], batch["area"])
