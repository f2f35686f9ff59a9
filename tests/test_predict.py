"""`cifar-ray predict`: classes of image files from a checkpoint, in-process and through Ray
Data, from files, folders, tars and an s3:// prefix; bad images named and skipped.

    python -m pytest -q tests/test_predict.py
"""

from __future__ import annotations

import copy
import io
import json
import re
import tarfile

import boto3
import numpy as np
import pytest
from PIL import Image

from cifar_ray import checkpoint, data, predict
from cifar_ray import model as M
from cifar_ray.cli import main as cli
from cifar_ray.config import PhaseConfig, PrepareConfig, TrainConfig
from cifar_ray.recipe import PhaseLoop
from cifar_ray.runtime import DeviceSplits, Runtime


def _png(px: np.ndarray, size: tuple[int, int] | None = None) -> bytes:
    im = Image.fromarray(px)
    if size:
        im = im.resize(size, Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint trained a little on the synthetic dataset (head on frozen features), the
    dataset's test images, and a folder, a tar and a lone file of them."""
    root = tmp_path_factory.mktemp("predict")
    data.prepare(PrepareConfig(source="synthetic", data=str(root / "data"), dataset="syn",
                               val_size=64, synthetic_size=512))
    cfg = TrainConfig(data=str(root / "data"), dataset="syn", weights="none", workers=1,
                      phase1=PhaseConfig(epochs=6, lr=3e-3, batch_size=64),
                      phase2=PhaseConfig(epochs=0))
    uri = cfg.dataset_uri()
    splits = DeviceSplits.of(data.load_split(uri, "train"), data.load_split(uri, "val"))
    model = M.build("none", num_classes=10)
    states = []
    PhaseLoop(cfg, model, splits, Runtime(),
              lambda m, st: states.append(copy.deepcopy(st()))).run()
    ckpt = root / "checkpoint-p1-e005"
    ckpt.mkdir()
    checkpoint.write_dir(states[-1], str(ckpt))
    test = data.load_split(uri, "test")
    imgs = root / "imgs"
    (imgs / "sub").mkdir(parents=True)
    files = {}
    for i in range(24):
        name = f"sub/{i:02d}-c{test.labels[i]}.png" if i % 2 else f"{i:02d}-c{test.labels[i]}.png"
        # Any size: half are stored at 96x80, as a camera's would be, and resized back.
        (imgs / name).write_bytes(_png(test.images[i], (96, 80) if i % 3 == 0 else None))
        files[name] = int(test.labels[i])
    (imgs / "broken.jpg").write_bytes(b"not an image")
    tar = root / "more.tar.gz"
    with tarfile.open(tar, "w:gz") as t:
        for i in range(24, 30):
            blob = _png(test.images[i])
            info = tarfile.TarInfo(f"more/{i:02d}-c{test.labels[i]}.png")
            info.size = len(blob)
            t.addfile(info, io.BytesIO(blob))
    lone = root / f"lone-c{test.labels[30]}.png"
    lone.write_bytes(_png(test.images[30]))
    return {"ckpt": str(ckpt), "imgs": str(imgs), "tar": str(tar), "lone": str(lone),
            "cfg": cfg, "model": model}


def _label(name: str) -> int:
    return int(name.rsplit("-c", 1)[1].split(".")[0])


def test_predictions_for_a_folder_a_tar_and_a_file_with_bad_images_skipped(trained):
    out = predict.predict(trained["ckpt"], [trained["imgs"], trained["tar"], trained["lone"]],
                          top_k=3)
    assert out["via"] == "in-process"
    names = [r["file"] for r in out["predictions"]]
    assert len(names) == 24 + 6 + 1 and "lone-c" in names[-1]
    assert any("/sub/" in n for n in names) and any("more.tar.gz/more/" in n for n in names)
    assert [s["file"] for s in out["skipped"]] == [f"{trained['imgs']}/broken.jpg"]
    assert out["skipped"][0]["error"] == "cannot decode image (not a JPEG or PNG image)"
    for r in out["predictions"]:
        p = [x["probability"] for x in r["predictions"]]
        assert len(p) == 3 and p == sorted(p, reverse=True) and sum(p) <= 1 + 1e-5
        assert all(x["class"].startswith("class") for x in r["predictions"])  # the manifest's
    # The same classes the model gives the decoded pixels, as evaluation would compute them.
    decoded = np.stack([data.decode(predict_bytes(r["file"]), r["file"])
                        for r in out["predictions"][:24]])
    direct = predict.Model.load(trained["ckpt"]).probabilities(decoded).argmax(1)
    assert [int(r["predictions"][0]["class"][5:]) for r in out["predictions"][:24]] == \
        direct.tolist()
    right = sum(int(r["predictions"][0]["class"][5:]) == _label(r["file"])
                for r in out["predictions"])
    assert right / len(names) > 0.5  # a learnt model, not chance (0.1)


def predict_bytes(name: str) -> bytes:
    with open(name, "rb") as f:
        return f.read()


def test_cli_table_json_and_bad_input(trained, capsys):
    assert cli(["predict", trained["ckpt"], trained["lone"], "--top-k", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["predictions"]) == 1 and len(out["predictions"][0]["predictions"]) == 2
    assert cli(["predict", trained["ckpt"], trained["imgs"]]) == 0
    captured = capsys.readouterr()
    assert "class (probability)" in captured.out
    assert re.search(r"broken.jpg +skipped: cannot decode image", captured.out)
    assert "1 image(s) skipped" in captured.err
    assert cli(["predict", trained["ckpt"], trained["imgs"] + "/nope"]) == 2
    assert "no such file, folder or archive" in capsys.readouterr().err
    assert cli(["predict", trained["ckpt"], trained["lone"], "--top-k", "0"]) == 2
    assert "--top-k 0: must be >= 1" in capsys.readouterr().err


@pytest.mark.ray
def test_ray_data_from_an_s3_prefix_gives_the_in_process_answers(trained, ray_local, bucket):
    s3 = boto3.client("s3")
    local = predict.predict(trained["ckpt"], [trained["imgs"]], top_k=2)
    for r in local["predictions"] + local["skipped"]:
        rel = r["file"][len(trained["imgs"]) + 1:]
        s3.put_object(Bucket=bucket, Key=f"incoming/{rel}", Body=predict_bytes(r["file"]))
    remote = predict.predict(trained["ckpt"], [f"s3://{bucket}/incoming/"], top_k=2,
                             use_ray=True)
    assert remote["via"] == "ray data"
    strip = len(f"s3://{bucket}/incoming/")
    assert [r["file"][strip:] for r in remote["predictions"]] == \
        [r["file"][len(trained["imgs"]) + 1:] for r in local["predictions"]]
    for a, b in zip(remote["predictions"], local["predictions"], strict=True):
        assert [x["class"] for x in a["predictions"]] == [x["class"] for x in b["predictions"]]
        assert a["predictions"][0]["probability"] == pytest.approx(
            b["predictions"][0]["probability"], abs=1e-5)
    assert [s["file"][strip:] for s in remote["skipped"]] == ["broken.jpg"]
