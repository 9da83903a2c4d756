"""Shared fixtures: tests generate their own pyramidal slides."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"  # real H&E shipped with the repository (data/README.md: sources, licences)
CMU = DATA / "CMU-1-Small-Region.svs"
FIELDS = ("he_breast_glands.png", "he_tumour_dense_nuclei.png")


def synthetic_he(h: int, w: int, *, seed: int = 0, blob=(0.5, 0.5, 0.3, 0.35)) -> tuple[np.ndarray, np.ndarray]:
    """An H&E-like image: a pink/purple elliptical tissue blob with nuclei on glass.

    Returns the (h, w, 3) uint8 image and the (h, w) bool ground-truth tissue mask.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx, ry, rx = blob[0] * h, blob[1] * w, blob[2] * h, blob[3] * w
    mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    img = np.full((h, w, 3), 243, np.uint8)
    img = img + rng.integers(-3, 4, size=(h, w, 1)).astype(np.int16)
    tissue = np.array([225, 150, 195], np.int16) + rng.integers(-15, 16, size=(h, w, 1))
    nuclei = rng.random((h, w)) < 0.01
    tissue[nuclei] = (90, 50, 140)
    img = np.where(mask[..., None], tissue, img)
    return np.clip(img, 0, 255).astype(np.uint8), mask


@pytest.fixture(scope="session")
def slides(tmp_path_factory) -> dict[str, Path]:
    """A set of generated slides (and broken files) shared by the whole session."""
    from tiling import write_pyramidal_tiff, write_svs

    d = tmp_path_factory.mktemp("slides")
    out: dict[str, Path] = {}
    img, _ = synthetic_he(3072, 4096, seed=1)
    out["tiff"] = write_pyramidal_tiff(d / "generic.tif", img, mpp=0.25)
    out["svs"] = write_svs(d / "aperio.svs", img, mpp=0.5, magnification=20)
    out["nompp"] = write_pyramidal_tiff(d / "nompp.tif", img, mpp=None)
    blank = np.full((2048, 2048, 3), 245, np.uint8)
    out["blank"] = write_pyramidal_tiff(d / "blank.tif", blank, mpp=0.5)
    # truncated copy: the file loses its last 40 %
    raw = out["tiff"].read_bytes()
    trunc = d / "truncated.tif"
    trunc.write_bytes(raw[: int(len(raw) * 0.6)])
    out["truncated"] = trunc
    # a slide that opens but whose level-0 tiles fail to decode part way: the JPEG data of the
    # middle third of the tiles of levels 0, 1 and 2 is zeroed (level 3 stays readable)
    import tifffile

    b = bytearray(raw)
    with tifffile.TiffFile(out["tiff"]) as tf:
        for page in tf.pages[:3]:
            offsets, counts = page.dataoffsets, page.databytecounts
            n = len(offsets)
            for off, cnt in zip(offsets[n // 3 : 2 * n // 3], counts[n // 3 : 2 * n // 3]):
                b[off : off + cnt] = bytes(cnt)
    corrupt = d / "corrupt_middle.tif"
    corrupt.write_bytes(bytes(b))
    out["corrupt_middle"] = corrupt
    empty = d / "empty.svs"
    empty.write_bytes(b"")
    out["empty"] = empty
    notslide = d / "notaslide.svs"
    notslide.write_text("this is not a slide\n")
    out["notaslide"] = notslide
    return out


@pytest.fixture(scope="session")
def he_image() -> tuple[np.ndarray, np.ndarray]:
    return synthetic_he(1024, 1536, seed=2)


@pytest.fixture(scope="session")
def real_fields() -> dict[str, tuple[np.ndarray, float]]:
    """The real H&E images of ``data/``: name -> ((H, W, 3) uint8 level-0 RGB, µm per pixel)."""
    from PIL import Image

    import tiling

    out = {}
    for name in FIELDS:
        with Image.open(DATA / name) as im:
            out[name.split(".")[0]] = (np.asarray(im.convert("RGB")), 0.5)
    with tiling.OpenSlideReader(CMU) as r:
        out["cmu1"] = (r.read_level(0), r.info.mpp)
    return out


@pytest.fixture()
def cmu_slide() -> Path:
    if not CMU.is_file():
        pytest.skip(f"real Aperio slide not present at {CMU}")
    return CMU


@pytest.fixture()
def slide_copy(tmp_path):
    """Copy a generated slide into the test's own folder (for tests that modify files)."""

    def _copy(src: Path, name: str | None = None) -> Path:
        dst = tmp_path / (name or src.name)
        shutil.copy2(src, dst)
        return dst

    return _copy


def copy_run(src: Path, dst: Path) -> Path:
    """A private copy of a run folder (session fixtures stay untouched)."""
    shutil.copytree(src, dst)
    (dst / ".lock").unlink(missing_ok=True)
    return dst


@pytest.fixture(scope="session")
def tiled(tmp_path_factory, slides):
    """A run folder with two slides tiled at 32 px, 1 µm/px (one with corrupt tiles)."""
    from wsi_explain import RunFolder, TileConfig, discover_slides, run_tile_stage

    d = tmp_path_factory.mktemp("tiled")
    cfg = TileConfig(tile_px=32, mpp_target=1.0, min_tissue=0.5, verify="none")
    with RunFolder(d / "run") as run:
        res = run_tile_stage(run, discover_slides([slides["tiff"], slides["corrupt_middle"]]), cfg)
    assert [r.status for r in res] == ["done", "done"]
    return d / "run"


@pytest.fixture(scope="session")
def extracted(tiled, tmp_path_factory):
    """The tiled run, extracted with the tiny CNN (gradcam, activations kept)."""
    from wsi_explain import RunFolder
    from wsi_explain.core.config import ExtractConfig
    from wsi_explain.stages.extract import run_extract_stage

    run_dir = copy_run(tiled, tmp_path_factory.mktemp("extracted") / "run")
    cfg = ExtractConfig(
        arch="tests.tiny_models:tiny_cnn",
        num_classes=2,
        methods=("gradcam",),
        activations=True,
        workers=0,
        batch_size=64,
        chunk_tiles=128,
    )
    with RunFolder(run_dir) as run:
        res = run_extract_stage(run, cfg)
    assert all(r.status == "done" for r in res)
    return run_dir


@pytest.fixture(scope="session")
def audit_run(tmp_path_factory, slides):
    """A small audit up to clustering: two labelled slides (one with a GeoJSON tumour
    annotation, one whose file name and site hold HTML), the tiny CNN with a 3-checkpoint
    ensemble, two fused CAMs and saliency."""
    import json

    import torch

    from tests.tiny_models import tiny_cnn
    from wsi_explain import RunFolder, TileConfig, discover_slides, run_tile_stage
    from wsi_explain.core.config import ClusterConfig, ExtractConfig
    from wsi_explain.stages.cluster import run_cluster_stage
    from wsi_explain.stages.extract import run_extract_stage

    d = tmp_path_factory.mktemp("audit")
    ckpts = []
    for seed in range(3):
        m = tiny_cnn(2)
        torch.manual_seed(100 + seed)
        with torch.no_grad():
            m.fc.weight.add_(0.3 * torch.randn_like(m.fc.weight))
        ckpts.append(d / f"model_{seed}.pt")
        torch.save(m.state_dict(), ckpts[-1])
    tumour = {
        "type": "Feature",
        "properties": {"classification": {"name": "Tumour"}},
        "geometry": {
            "type": "Polygon",
            "coordinates": [[[1000, 800], [3000, 800], [3000, 2200], [1000, 2200], [1000, 800]]],
        },
    }
    (d / "tumour.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [tumour]}))
    # a file name and a site that would run script if they reached HTML unescaped
    evil = d / "<script>alert(1)<script>.svs"
    shutil.copyfile(slides["svs"], evil)
    (d / "cohort.csv").write_text(
        f"path,annotations,label,site\n{slides['tiff']},tumour.geojson,1,A\n{evil},,0,<img src=x onerror=alert(2)>\n"
    )
    run_dir = d / "run"
    with RunFolder(run_dir) as run:
        run_tile_stage(run, discover_slides([d / "cohort.csv"]), TileConfig(tile_px=32, mpp_target=1.0, verify="none"))
        ecfg = ExtractConfig(
            arch="tests.tiny_models:tiny_cnn",
            weights=str(ckpts[0]),
            ensemble=tuple(map(str, ckpts[1:])),
            num_classes=2,
            methods=("gradcam", "hirescam", "saliency"),
            attr_sample=24,
            workers=0,
            batch_size=64,
            chunk_tiles=128,
        )
        assert all(r.status == "done" for r in run_extract_stage(run, ecfg))
        run_cluster_stage(run, ClusterConfig(method="kmeans", k=3, pca=16, positive_labels=("Tumour",)))
    return run_dir


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """``wsi-explain demo`` run once per session: (run folder, its CompletedProcess, the command).
    Tests that write into the run work on a copy (:func:`copy_run`)."""
    import subprocess
    import sys

    run = tmp_path_factory.mktemp("demo") / "run"
    cmd = [sys.executable, "-m", "wsi_explain.cli", "demo", "--out", str(run)]
    return run, subprocess.run(cmd, capture_output=True, text=True), cmd


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium (Debian's, driven by playwright). `make test` installs it and sets
    WSI_EXPLAIN_REQUIRE_BROWSER=1, so there a missing browser fails instead of skipping."""
    import os

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("WSI_EXPLAIN_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium is not installed (make test installs Debian's chromium)")
        pytest.skip("chromium is not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield b
        b.close()


class PageWatch:
    """A page that records console errors, uncaught exceptions and dialogs (alert = script ran)."""

    def __init__(self, browser, viewport=(1280, 1400)) -> None:
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))

        def on_dialog(d):
            self.dialogs.append(d.message)
            d.dismiss()

        self.page.on("dialog", on_dialog)

    def model(self, name: str, expr: str):
        """Evaluate ``expr`` with ``m`` bound to the Bokeh model called ``name``."""
        return self.page.evaluate(
            f"() => {{ const m = Bokeh.documents[0].get_model_by_name({name!r}); return {expr}; }}"
        )

    def drag_select(self, figure_name: str, frac=(0.0, 0.0, 0.6, 0.6)) -> None:
        """Drag a box over a Bokeh figure's frame (its active drag tool is box select)."""
        l, t, fl, ft, fw, fh = self.page.evaluate(
            f"() => {{ const v = Bokeh.index.find_one(Bokeh.documents[0].get_model_by_name({figure_name!r}));"
            " const r = v.el.getBoundingClientRect(); const f = v.frame.bbox;"
            " return [r.left, r.top, f.left, f.top, f.width, f.height]; }"
        )
        x0, y0 = l + fl + 2 + frac[0] * fw, t + ft + 2 + frac[1] * fh
        self.page.mouse.move(x0, y0)
        self.page.mouse.down()
        self.page.mouse.move(l + fl + frac[2] * fw, t + ft + frac[3] * fh, steps=8)
        self.page.mouse.up()
        self.page.wait_for_timeout(500)

    def close(self) -> None:
        self.page.close()
