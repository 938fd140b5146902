"""Models: shared building blocks (common) and the detectors built from them."""
