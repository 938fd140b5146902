"""groundlab: open-vocabulary detection and segmentation experiments (Grounding DINO, Mask Grounding DINO, MAL)."""

__version__ = "0.1.0"
