"""Model building blocks shared by the detectors: box ops and NMS."""
