"""The console is for the user: a training run prints groundlab's lines and one progress bar, no library
chatter; an error the user can fix prints one sentence and exits 2 without a traceback."""

from __future__ import annotations

import json

import pytest

from conftest import TINY_GDINO, run_py

TRAIN = ["experiment=quickstart", *TINY_GDINO, "dataset.synthetic.num_train=8", "dataset.synthetic.num_val=4",
         "dataset.synthetic.image_size=[64,64]", "dataset.workers=0", "dataset.batch_size=4",
         "dataset.augmentation.scales=[64]", "dataset.augmentation.test_random_resize=64",
         "dataset.augmentation.train_random_resize=[64]", "dataset.augmentation.train_random_crop_min=48",
         "dataset.augmentation.train_random_crop_max=64", "train.num_epochs=1"]

pytestmark = pytest.mark.slow  # each test runs run.py in a fresh process (a few seconds of imports)

CHATTER = ("GPU available", "TPU available", "Tip:", "litlogger", "LOAD REPORT", "Loading weights", "LeafSpec",
           "eval mode", "transfer_batch_to_device", "weights_only", "Trainable params", "Traceback")


def test_training_console_has_no_library_chatter(tmp_path):
    proc = run_py(*TRAIN, f"hydra.run.dir={tmp_path}", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert [c for c in CHATTER if c in out] == []
    assert "gdino: " in out and "M parameters" in out and "val_mAP50: " in out
    lines = [line for line in out.splitlines() if "GPU available" in line or "run dir:" in line]
    assert len(lines) == 1  # each line once (Lightning's own handler used to print a second copy)


def _one_sentence(proc, *fragments):
    assert proc.returncode == 2, proc.stdout[-1500:] + proc.stderr[-1500:]
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(("error: ", "config error: ")), proc.stderr
    for fragment in fragments:
        assert fragment in err[0], err[0]


def test_a_malformed_odvg_line_is_one_sentence(tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"file_name": "b.jpg", "height": 5\n')
    (tmp_path / "labels.json").write_text(json.dumps({"0": "cat"}))
    (tmp_path / "img").mkdir()
    proc = run_py(*TRAIN, "dataset.type=odvg",
                  f"dataset.train_data_sources=[{{image_dir: {tmp_path / 'img'}, json_file: {bad}, "
                  f"label_map: {tmp_path / 'labels.json'}}}]", f"hydra.run.dir={tmp_path / 'run'}")
    _one_sentence(proc, "train.jsonl:1", "JSON")


def test_a_missing_image_is_one_sentence(tmp_path):
    (tmp_path / "img").mkdir()
    ann = tmp_path / "val.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "gone.jpg", "height": 8, "width": 8}],
                               "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 3, 3]}],
                               "categories": [{"id": 1, "name": "cat"}]}))
    proc = run_py(*TRAIN, "action=evaluate", "evaluate.checkpoint=unused.pth", "dataset.type=coco",
                  f"dataset.test_data_sources={{image_dir: {tmp_path / 'img'}, json_file: {ann}}}",
                  f"hydra.run.dir={tmp_path / 'run'}")
    _one_sentence(proc, "gone.jpg")


def test_a_missing_text_encoder_is_one_sentence(tmp_path):
    proc = run_py(*TRAIN, f"model.text_encoder_type={tmp_path / 'no_bert'}", f"hydra.run.dir={tmp_path / 'run'}")
    _one_sentence(proc, "model.text_encoder_type", "no_bert")


def test_the_traceback_is_one_variable_away(tmp_path):
    proc = run_py(*TRAIN, f"model.text_encoder_type={tmp_path / 'no_bert'}", f"hydra.run.dir={tmp_path / 'run'}",
                  env={"GROUNDLAB_TRACEBACK": "1", "HYDRA_FULL_ERROR": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "TextEncoderNotFound" in proc.stderr


def test_an_error_from_a_loader_worker_keeps_its_one_sentence():
    import torch

    from groundlab.errors import DataError, user_message

    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise DataError("label 7 is not in the label map", "train.jsonl:17")

    with pytest.raises(DataError) as info:
        next(iter(torch.utils.data.DataLoader(Broken(), num_workers=1)))
    assert "Original Traceback" in str(info.value)  # what torch hands over
    assert user_message(info.value) == "train.jsonl:17: label 7 is not in the label map"
