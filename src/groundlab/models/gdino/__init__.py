"""Grounding DINO: model parts and post-processing of its outputs."""
