"""The student's strong augmentation in MAL (the teacher sees the clean crop): colour jitter, random
grayscale, Gaussian blur, as in BYOL/DINO-style self-training. PIL only, so it runs in the workers."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter


class StudentAugment:
    """__call__(crop (S, S, 3) uint8, rng) -> (S, S, 3) uint8. Probabilities and strengths as BYOL's view."""

    def __init__(self, jitter_p: float = 0.8, brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.2, hue: float = 0.1, gray_p: float = 0.2, blur_p: float = 0.5,
                 blur_sigma=(0.1, 2.0)):
        self.jitter_p, self.gray_p, self.blur_p = jitter_p, gray_p, blur_p
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self.blur_sigma = blur_sigma

    def _jitter(self, im: Image.Image, rng: np.random.Generator) -> Image.Image:
        ops = [("b", self.brightness), ("c", self.contrast), ("s", self.saturation), ("h", self.hue)]
        for i in rng.permutation(len(ops)):
            kind, strength = ops[i]
            if kind == "h":
                hsv = np.asarray(im.convert("HSV")).copy()
                hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(rng.uniform(-strength, strength) * 255)) % 256
                im = Image.fromarray(hsv, "HSV").convert("RGB")
            else:
                factor = rng.uniform(max(0.0, 1 - strength), 1 + strength)
                enhancer = {"b": ImageEnhance.Brightness, "c": ImageEnhance.Contrast, "s": ImageEnhance.Color}[kind]
                im = enhancer(im).enhance(factor)
        return im

    def __call__(self, crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        im = Image.fromarray(crop)
        if rng.random() < self.jitter_p:
            im = self._jitter(im, rng)
        if rng.random() < self.gray_p:
            im = im.convert("L").convert("RGB")
        if rng.random() < self.blur_p:
            im = im.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(*self.blur_sigma))))
        return np.asarray(im)
