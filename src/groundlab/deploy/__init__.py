"""Deployment: writers for inference outputs (KITTI labels, COCO results, annotated images)."""
