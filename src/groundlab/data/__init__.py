"""Data layer: annotation readers, image sources, captions and token maps, transforms, synthetic data."""
