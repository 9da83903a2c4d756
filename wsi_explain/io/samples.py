"""Tiles of a sample re-read from their slides, with the annotation regions under them (for the
score stage's expensive metrics): one open slide and one parsed annotation per slide, reused for
every sampled tile of that slide."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["SampleReader", "grades_for"]

logger = logging.getLogger(__name__)


def grades_for(classes: list[str], positive: tuple[str, ...], grades: dict[str, float] | None) -> dict[str, float]:
    """Graded-hit score of each annotation class: explicit ``grades`` (matched case-insensitively),
    else positive labels in order 3, 2, 1 (then 1) and the other classes 0."""
    from tiling import label_column

    if grades:
        g = {label_column(k): float(v) for k, v in grades.items()}
        return {c: g.get(label_column(c), 0.0) for c in classes}
    pos = [label_column(p) for p in positive]
    return {c: float(max(3 - pos.index(label_column(c)), 1)) if label_column(c) in pos else 0.0 for c in classes}


@dataclass
class _SlideInfo:
    tiles: pd.DataFrame
    meta: dict
    targets: np.ndarray
    dataset: object  # TileDataset: one slide handle per slide, reused for every sampled tile
    annotations: object = None  # AnnotationRegions, None for a slide without usable annotations


class SampleReader:
    """Reads sampled tiles (slide_id, tile_id rows) of a run.

    Parameters
    ----------
    run_path : the run folder.
    normalise : callable, uint8 (N, px, px, 3) -> float tensor (N, 3, px, px) (the model's).
    positive : annotation classes counted as positive (the localisation region, grades).
    grades : explicit graded-hit score per class, or None (see :func:`grades_for`).
    """

    def __init__(self, run_path: Path, normalise, positive: tuple[str, ...], grades: dict[str, float] | None) -> None:
        self.run_path, self.normalise, self.positive, self.grades = Path(run_path), normalise, positive, grades
        self._slides: dict[str, _SlideInfo] = {}

    def _slide(self, sid: str) -> _SlideInfo:
        if sid not in self._slides:
            from wsi_explain.io.features import open_store
            from wsi_explain.io.tile_table import read_tile_table

            sdir = self.run_path / "slides" / sid
            tiles, meta = read_tile_table(sdir / "tiles.parquet")
            targets = np.asarray(open_store(sdir / "features.zarr")["targets"][:], np.int64)
            from wsi_explain.io.loader import TileDataset

            ds = TileDataset(meta["slide_path"], tiles, mpp=meta.get("level0_mpp"))
            info = _SlideInfo(tiles, meta, targets, ds)
            self._load_annotations(info)
            self._slides[sid] = info
        return self._slides[sid]

    def _load_annotations(self, info: _SlideInfo) -> None:
        import tiling
        from wsi_explain.io.regions import AnnotationRegions

        if not (info.meta.get("annotations") or info.meta.get("label_mask")):
            return
        try:
            info.annotations = AnnotationRegions(info.meta)
        except (tiling.AnnotationError, OSError) as exc:  # scored without localisation, and said so
            logger.warning("slide %s: annotations unusable for localisation (%s)", info.meta.get("slide_id"), exc)

    def target_masks(self, sample: pd.DataFrame, px: int, labels: tuple[str, ...]) -> np.ndarray:
        """(N, px, px) bool: the annotated area (classes ``labels``, default all) under each sampled
        tile: the region of a segmentation model explained with ``region="annotation"``. A slide
        without usable annotations raises the error that names it."""
        from wsi_explain.io.regions import AnnotationRegions

        out = np.zeros((len(sample), px, px), bool)
        for sid, idx in sample.groupby("slide_id").indices.items():
            info = self._slide(sid)
            ann = info.annotations or AnnotationRegions(info.meta)  # raises, naming the slide
            out[idx] = ann.masks(info.tiles.iloc[sample["tile_id"].to_numpy()[idx].astype(int)], px, labels)
        return out

    def images(self, sample: pd.DataFrame) -> tuple[object, np.ndarray, np.ndarray]:
        """Normalised inputs (N, 3, px, px) float32 tensor on the CPU, the extraction's targets (N,)
        int64, and an ok flag per tile (N,) bool (a tile that cannot be decoded is logged)."""
        imgs, tg, ok = [], [], []
        self.errors = []  # (slide_id, tile_id, message) of this call's unreadable tiles
        for sid, tid in zip(sample["slide_id"], sample["tile_id"]):
            info = self._slide(sid)
            _, img, good, err = info.dataset[int(tid)]
            if not good:
                logger.warning("slide %s tile %d: %s (left out of the metrics)", sid, tid, err)
                self.errors.append((sid, int(tid), err))
            imgs.append(np.asarray(img))
            tg.append(info.targets[int(tid)])
            ok.append(bool(good))
        x = self.normalise(np.stack(imgs)).float().cpu().contiguous()
        return x, np.asarray(tg, np.int64), np.asarray(ok)

    def regions(self, sample: pd.DataFrame, px: int):
        """(N, px, px) bool region of interest and int grade codes + their grades, or None."""
        import tiling

        region = np.zeros((len(sample), px, px), bool)
        codes = np.zeros((len(sample), px, px), np.int32)
        grade_of: dict[int, float] = {0: -1.0}
        names: dict[str, int] = {}
        any_ann = False
        for sid, idx in sample.groupby("slide_id").indices.items():
            info = self._slide(sid)
            if info.annotations is None:
                continue
            masks = info.annotations.class_masks(info.tiles.iloc[sample["tile_id"].to_numpy()[idx].astype(int)], px)
            any_ann = True
            grades = grades_for(list(masks), self.positive, self.grades)
            pos = {tiling.label_column(p) for p in self.positive}
            best = np.full((len(idx), px, px), -np.inf)
            for name, mk in masks.items():
                if not pos or tiling.label_column(name) in pos:
                    region[idx] |= mk
                code = names.setdefault(name, len(names) + 1)
                grade_of[code] = grades[name]
                better = mk & (grades[name] > best)
                codes[idx] = np.where(better, code, codes[idx])
                best = np.where(better, grades[name], best)
        return (region, codes, grade_of) if any_ann else None
