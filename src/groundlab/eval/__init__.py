"""Evaluation: COCO detection / instance segmentation metrics (pycocotools) and results.json."""
