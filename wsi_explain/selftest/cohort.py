"""The self-test's cohorts: a run's own clean tiles, rearranged into small slides, with known
shortcuts planted into copies of them.

Design (:func:`design_cohort`): ``n_slides`` slides of ``tiles_per_slide`` tiles each. Slide ``i``
gets the plant kind ``kinds[i % len(kinds)]`` and the synthetic label ``(i // len(kinds)) % 2``,
so every kind has as many positive as negative slides. In a positive slide ``share_pos`` of the
tiles carry the slide's plant, in a negative one ``share_neg``: the plant is correlated with the
label, as a shortcut is, but not identical to it. A stain shift is a property of a whole slide
(its staining protocol or lab), so the kinds of :data:`WHOLE_SLIDE_KINDS` are planted into every
tile of every positive slide and of one negative slide of the kind (of two or more).
Source tiles are drawn without replacement
(with replacement only when the run has too few clean tiles). The control cohort is the same
design with nothing planted.

Slides (:func:`write_cohort`): each slide is a mosaic of its tiles on a grid of ``tile_px``
cells with a one-cell margin of glass, written as a pyramidal TIFF at the tiles' resolution, so
that the tiling stage's grid falls exactly on the cells.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd

from tiling import write_pyramidal_tiff
from tiling.plants import plant

__all__ = ["DESIGN_COLUMNS", "WHOLE_SLIDE_KINDS", "design_cohort", "write_cohort", "training_tiles", "cell_of"]

#: plant kinds that cover whole slides (the others cover a share of a slide's tiles)
WHOLE_SLIDE_KINDS = ("stain",)

#: one row per tile of the self-test cohort
DESIGN_COLUMNS = ["slide_id", "label", "kind", "cell", "source", "planted"]


def design_cohort(
    n_sources: int,
    *,
    n_slides: int = 18,
    tiles_per_slide: int = 16,
    kinds: tuple[str, ...] = ("ink", "blur", "stain"),
    share_pos: float = 0.5,
    share_neg: float = 0.125,
    seed: int = 0,
) -> pd.DataFrame:
    """Which source tile goes where, and which tiles get a plant.

    Parameters
    ----------
    n_sources : int
        Clean source tiles available (rows of the source table).
    n_slides, tiles_per_slide : int
        Size of the cohort (at least 2 slides per kind: one of each label).
    kinds : tuple of str
        Plant kinds (:data:`tiling.plants.PLANT_KINDS`).
    share_pos, share_neg : float in [0, 1]
        Share of planted tiles in positive and negative slides.
    seed : int

    Returns
    -------
    DataFrame with :data:`DESIGN_COLUMNS`: ``slide_id`` (str), ``label`` (0/1), ``kind`` (the
    slide's plant kind), ``cell`` (position in the slide's mosaic, raster order), ``source`` (row
    of the source table), ``planted`` (bool).
    """
    if not kinds:
        raise ValueError("no plant kind given")
    if n_slides < 2 * len(kinds):
        raise ValueError(f"{n_slides} slides are too few for {len(kinds)} plant kinds (two slides per kind at least)")
    if n_sources < 1:
        raise ValueError("the run has no clean tile to build the self-test cohort from")
    rng = np.random.default_rng(seed)
    n = n_slides * tiles_per_slide
    source = rng.permutation(n_sources)[:n] if n_sources >= n else rng.integers(0, n_sources, n)
    rows = []
    negatives: dict[str, int] = {}  # negative slides of each kind so far
    for i in range(n_slides):
        kind, label = kinds[i % len(kinds)], (i // len(kinds)) % 2
        k = int(round((share_pos if label else share_neg) * tiles_per_slide))
        if kind in WHOLE_SLIDE_KINDS:
            negatives[kind] = negatives.get(kind, 0) + (1 - label)
            whole = label or (negatives[kind] == 1 and (n_slides // len(kinds)) // 2 >= 2)
            k = tiles_per_slide if whole else 0
        planted = np.zeros(tiles_per_slide, bool)
        planted[rng.permutation(tiles_per_slide)[:k]] = True
        for c in range(tiles_per_slide):
            rows.append(
                {
                    "slide_id": f"selftest_{i:02d}_{kind}_{'pos' if label else 'neg'}",
                    "label": label,
                    "kind": kind,
                    "cell": c,
                    "source": int(source[i * tiles_per_slide + c]),
                    "planted": bool(planted[c]),
                }
            )
    return pd.DataFrame(rows, columns=DESIGN_COLUMNS)


def _layout(tiles_per_slide: int) -> tuple[int, int]:
    cols = int(np.ceil(np.sqrt(tiles_per_slide)))
    return cols, int(np.ceil(tiles_per_slide / cols))


def cell_of(x: np.ndarray, y: np.ndarray, *, tile_px: int, tiles_per_slide: int) -> np.ndarray:
    """Mosaic cell of tiles at level-0 ``x, y`` (pixels; the slides are written at the tiles'
    resolution); -1 for the glass margin."""
    cols, rows = _layout(tiles_per_slide)
    cx, cy = np.asarray(x) // tile_px - 1, np.asarray(y) // tile_px - 1
    inside = (cx >= 0) & (cx < cols) & (cy >= 0) & (cy < rows)
    cell = cy * cols + cx
    return np.where(inside & (cell < tiles_per_slide), cell, -1)


def write_cohort(
    images: np.ndarray,
    design: pd.DataFrame,
    out_dir: Path,
    *,
    mpp: float,
    glass: tuple[int, int, int] = (242, 242, 240),
    planted: bool = True,
    seed: int = 0,
) -> Path:
    """Write the cohort's slides and its cohort CSV; returns the CSV's path.

    Parameters
    ----------
    images : (n_sources, tile_px, tile_px, 3) uint8
        The source tiles (not modified).
    design : DataFrame from :func:`design_cohort`
    out_dir : Path
        Gets ``<slide_id>.tif`` per slide, ``cohort.csv`` (path, slide_id, label, plant) and
        ``design.json`` (the design and parameters; when it matches, nothing is rewritten).
    mpp : float
        µm per pixel of the tiles (and of the slides' level 0).
    glass : RGB of the margin.
    planted : bool
        False writes the control: the same slides with nothing planted.
    seed : int
        Seeds the ink strokes.
    """
    out_dir = Path(out_dir)
    stamp = json.dumps({"planted": planted, "seed": seed, "mpp": mpp, "tiles": design.to_dict("list")})
    csv_path = out_dir / "cohort.csv"
    if csv_path.exists() and (out_dir / "design.json").exists() and (out_dir / "design.json").read_text() == stamp:
        return csv_path  # the same cohort is already written: a rerun reuses it (and the stages skip)
    out_dir.mkdir(parents=True, exist_ok=True)
    px = images.shape[1]
    per_slide = int(design.groupby("slide_id").size().max())
    cols, rows = _layout(per_slide)
    rng = np.random.default_rng(seed)
    records = []
    for sid, g in design.groupby("slide_id", sort=True):
        canvas = np.empty(((rows + 2) * px, (cols + 2) * px, 3), np.uint8)
        canvas[:] = np.asarray(glass, np.uint8)
        for r in g.itertuples():
            img = images[r.source]
            if planted and r.planted:
                img = plant(r.kind, img, rng, mpp=mpp)
            y, x = (r.cell // cols + 1) * px, (r.cell % cols + 1) * px
            canvas[y : y + px, x : x + px] = img
        path = write_pyramidal_tiff(out_dir / f"{sid}.tif", canvas, mpp=mpp, min_level_size=px)
        kind = g["kind"].iloc[0] if planted else "none"
        records.append({"path": path.name, "slide_id": sid, "label": int(g["label"].iloc[0]), "plant": kind})
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "slide_id", "label", "plant"])
        w.writeheader()
        w.writerows(records)
    (out_dir / "design.json").write_text(stamp)
    return csv_path


def training_tiles(
    images: np.ndarray, design: pd.DataFrame, *, mpp: float, planted: bool = True, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The tiles of a design as the shortcut model is trained on them, in memory (no slide written).

    Returns
    -------
    (n, px, px, 3) uint8 tiles (planted where the design says, when ``planted``) and (n,) int
    slide labels, in the design's row order.
    """
    rng = np.random.default_rng(seed)
    out = np.empty((len(design), *images.shape[1:]), np.uint8)
    for i, r in enumerate(design.itertuples()):
        out[i] = plant(r.kind, images[r.source], rng, mpp=mpp) if planted and r.planted else images[r.source]
    return out, design["label"].to_numpy(int)
