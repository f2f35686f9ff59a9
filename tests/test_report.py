"""`cifar-ray inspect ... --html`: one self-contained file, checked in a real headless browser
(Debian's Chromium through its ChromeDriver) at a laptop's and a phone's width.

    python -m pytest -q tests/test_report.py

The run and the sweep are real folders (configs, metrics, a real checkpoint of the model,
result.json / best.json as the jobs write them) built here without Ray.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import shutil

import numpy as np
import pytest
from conftest import require
from PIL import Image

from cifar_ray import checkpoint, data, runs, timeline
from cifar_ray import model as M
from cifar_ray.cli import main as cli
from cifar_ray.config import PhaseConfig, PrepareConfig, SweepConfig, TrainConfig

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def _run(folder, cfg: TrainConfig, rows: list[dict], split: str = "test") -> None:
    """A finished run folder: config, metrics, its best checkpoint and result.json."""
    runs.write_config(cfg)
    runs.write_metrics(str(folder), rows)
    best = max(rows, key=lambda r: r["val_acc"])
    ckpt = folder / checkpoint.dir_name(best["phase"], best["epoch"])
    ckpt.mkdir(parents=True)
    state = {"model": M.build("none", num_classes=10, seed=1).state_dict(), "phase":
             best["phase"], "epoch": best["epoch"], "history": rows, "config": cfg.to_dict()}
    checkpoint.write_dir(state, str(ckpt))
    ev = {"split": split, "accuracy": 0.1, "loss": 2.3, "count": 80}
    runs.write_json(str(folder / runs.RESULT), {**runs.evaluated(best, str(ckpt), ev),
                                                "wall_seconds": 40.0, "timeline": RUN_TL})


# Where a run's and the sweep's walls went, as train.fit and tune.sweep record them.
RUN_TL = timeline.build(40.0, {"ray_start": 6.0, "worker_start": 3.0, "data_load": 1.5,
                               "phase1_training": 4.0, "phase2_training": 15.0,
                               "validation": 2.0, "checkpoints": 5.0, "final_evaluation": 1.0,
                               "shutdown": 0.5})
SWEEP_TL = timeline.build(90.0, {"ray_start": 6.0, "phase1": 20.0, "trials": 55.0,
                                 "final_evaluation": 3.0}, parts=timeline.SWEEP_PARTS)


def _rows(phases: tuple[int, int], lr: float) -> list[dict]:
    out, g = [], 0
    for phase, n in zip((1, 2), phases, strict=True):
        for e in range(n):
            g += 1
            out.append({"phase": phase, "epoch": e, "global_epoch": g, "train_loss": 2 - g / 10,
                        "val_loss": 2.1 - g / 12, "train_acc": 0.1 + g / 30,
                        "val_acc": 0.1 + g / 40 + lr, "lr_start": lr, "lr_end": lr / 2,
                        "images_per_s": 300.0, "seconds": 5.0, "feature_cache": phase == 1})
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    data.prepare(PrepareConfig(source="synthetic", data=str(root / "data"), dataset="syn",
                               val_size=40, synthetic_size=200))
    base = TrainConfig(data=str(root / "data"), dataset="syn", storage=str(root / "runs"),
                       weights="none", workers=1,
                       phase1=PhaseConfig(epochs=2), phase2=PhaseConfig(epochs=3))
    run = dataclasses.replace(base, name="one")
    _run(root / "runs" / "one", run, _rows((2, 3), 0.0))
    exp = root / "runs" / "sweep"
    _run(exp / runs.PHASE1, dataclasses.replace(base, name=runs.PHASE1,
                                                storage=str(exp)), _rows((2, 0), 0.0))
    sweep = SweepConfig(train=dataclasses.replace(base, name="sweep"))
    best = None
    for i, lr in enumerate((1e-4, 1e-3, 1e-2)):
        cfg = dataclasses.replace(sweep.train, name=f"trial-t{i}",
                                  storage=str(exp / runs.TRIALS),
                                  phase2=dataclasses.replace(base.phase2, lr=lr))
        rows = [r for r in _rows((2, 3), lr * 10) if r["phase"] == 2]
        _run(exp / runs.TRIALS / f"trial-t{i}", cfg, rows)
        runs.write_json(str(exp / runs.TRIALS / f"trial-t{i}" / runs.TIMELINE), RUN_TL)
        best = {"trial": f"trial-t{i}", "lr": lr, "weight_decay": 0.05,
                **runs.read_json(str(exp / runs.TRIALS / f"trial-t{i}" / runs.RESULT))}
    runs.write_json(str(exp / runs.BEST), {**best, "wall_seconds": 90.0, "timeline": SWEEP_TL})
    return {"run": str(root / "runs" / "one"), "sweep": str(exp), "out": root / "html"}


def test_inspect_shows_where_the_wall_went_as_text_json_and_a_bar(folders, capsys):
    # The text: a `timeline:` line under the result; --json: the dict as stored.
    for kind, tl in (("run", RUN_TL), ("sweep", SWEEP_TL)):
        assert cli(["inspect", folders[kind]]) == 0
        assert f"timeline: {timeline.line(tl)}" in capsys.readouterr().out.splitlines()
        assert cli(["inspect", folders[kind], "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert (out["result"] if kind == "run" else out["best"])["timeline"] == tl
    assert cli(["inspect", folders["sweep"], "--json"]) == 0
    assert [t["timeline"] for t in json.loads(capsys.readouterr().out)["trials"]] == [RUN_TL] * 3
    # The HTML: one bar a run, the sweep's and each trial's on a sweep's page; a segment per
    # part above 0 s, as wide as its share of the wall, and a legend with its seconds.
    out = folders["out"] / "timeline.html"
    assert cli(["inspect", folders["run"], "--html", str(out)]) == 0
    page = out.read_text()
    (bar,) = re.findall(r"<div class='bar'.*?</div>", page)
    widths = [float(w) for w in re.findall(r"width:([\d.]+)%", bar)]
    assert len(widths) == sum(v > 0 for v in RUN_TL["seconds"].values()) == 10
    assert sum(widths) == pytest.approx(100, abs=0.05)
    assert "width:37.50%" in bar  # phase 2 training: 15 s of 40
    assert "phase 2 training 15.0 s" in page and "blocked on checkpoints 5.0 s" in page
    assert cli(["inspect", folders["sweep"], "--html", str(out)]) == 0
    assert out.read_text().count("<div class='bar'") == 4


@pytest.fixture(scope="module")
def browser():
    require(bool(CHROMIUM and DRIVER),
            "Chromium and its ChromeDriver are not on PATH: apt-get install chromium "
            "chromium-driver (as .ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def _not_blank(png: bytes) -> bool:
    px = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
    return px.std() > 5  # a blank (or failed) image is one flat colour


@pytest.mark.parametrize("kind,rows", [("run", 5), ("sweep", 3)])
def test_report_renders_its_table_and_every_figure_at_laptop_and_phone_width(
        folders, browser, kind, rows, capsys):
    out = folders["out"] / f"{kind}.html"
    assert cli(["inspect", folders[kind], "--html", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    page = out.read_text()
    # Self-contained: no address the browser could fetch.
    assert not re.search(r"""(src|href)\s*=\s*['"]?(https?:)?//""", page)
    from selenium.webdriver.common.by import By

    for width, height in ((1280, 900), (390, 844)):  # a laptop; a phone (CSS pixels)
        browser.set_window_size(width, height)
        browser.get(out.as_uri())
        assert browser.find_element(By.TAG_NAME, "h1").text.startswith(
            "Run " if kind == "run" else "Sweep ")
        body = browser.find_elements(By.CSS_SELECTOR, "table tbody tr")
        assert len(body) == rows and all(r.is_displayed() for r in body)
        if kind == "sweep":
            assert len(browser.find_elements(By.CSS_SELECTOR, "tr.best")) == 1
        images = browser.find_elements(By.TAG_NAME, "img")
        assert len(images) == (3 if kind == "run" else 4)  # curves (+ LR), confusion, samples
        bars = browser.find_elements(By.CSS_SELECTOR, ".timeline .bar")
        assert len(bars) == (1 if kind == "run" else 4)  # the run; the sweep and its trials
        for bar in bars:  # each as wide as the page's text, its segments filling it
            segments = bar.find_elements(By.TAG_NAME, "span")
            assert 0 < bar.size["width"] <= browser.execute_script(
                "return document.documentElement.clientWidth")
            assert sum(s.size["width"] for s in segments) == pytest.approx(
                bar.size["width"], abs=len(segments))
        page_width = browser.execute_script("return document.documentElement.clientWidth")
        for img in images:
            assert browser.execute_script(
                "return arguments[0].complete && arguments[0].naturalWidth", img) == 800
            assert browser.execute_script("return arguments[0].naturalHeight", img) == 600
            shown = img.size
            assert 0 < shown["width"] <= page_width  # scaled to the screen, never cut off
            assert abs(shown["height"] / shown["width"] - 0.75) < 0.02  # aspect kept
            browser.execute_script("arguments[0].scrollIntoView()", img)
            assert _not_blank(img.screenshot_as_png)
        # Nothing but the tables' own scrolling box is wider than the screen.
        assert browser.execute_script(
            "return document.documentElement.scrollWidth") <= page_width
        assert _not_blank(browser.get_screenshot_as_png())
