"""Mask Auto-Labeler: box-supervised instance segmentation (ViT backbone, EMA teacher, MIL + CRF losses)."""
