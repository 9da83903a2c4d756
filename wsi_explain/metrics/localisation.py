"""Localisation: do the maps point at the annotated region?

Maps ``(N, h, w)`` are resized bilinearly to the masks' size ``(N, H, W)``. Masks are boolean
(the region of interest, e.g. the annotated tumour) or, for :func:`graded_hit`, integer label maps.
Inputs with an empty mask get NaN (they carry no information about localisation).
"""

from __future__ import annotations

import numpy as np

from wsi_explain.explain.maps import minmax_maps

from ._common import as_tensor_maps

__all__ = ["pointing_game", "graded_hit", "relevance_mass", "relevance_rank", "iou_coverage"]


def _resized(maps, masks) -> tuple[np.ndarray, np.ndarray]:
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got {masks.shape}")
    m = as_tensor_maps(maps, masks.shape[-2:]).numpy()
    if len(m) != len(masks):
        raise ValueError(f"{len(m)} maps for {len(masks)} masks")
    return m, masks


def pointing_game(maps, masks) -> np.ndarray:
    """1.0 where the map's maximum (first one in raster order) falls inside the mask, else 0.0;
    NaN for an empty mask. Returns (N,) float32."""
    m, mk = _resized(maps, masks)
    mk = mk.astype(bool)
    peak = m.reshape(len(m), -1).argmax(1)
    hit = mk.reshape(len(mk), -1)[np.arange(len(mk)), peak].astype(np.float32)
    hit[~mk.reshape(len(mk), -1).any(1)] = np.nan
    return hit


def graded_hit(maps, label_maps, *, grades: dict[int, float], default: float = -1.0) -> np.ndarray:
    """Graded hit rate: the grade of the label under the map's peak.

    ``label_maps`` (N, H, W) int hold ordered label layers (e.g. 3 = the target lesion, 2 and 1 =
    neighbouring grades, 0 = other tissue, -1 = background), mapped to scores by ``grades``;
    labels absent from ``grades`` score ``default``. Returns (N,) float32.
    """
    m, lab = _resized(maps, label_maps)
    peak = m.reshape(len(m), -1).argmax(1)
    at = lab.reshape(len(lab), -1)[np.arange(len(lab)), peak]
    return np.array([grades.get(int(v), default) for v in at], np.float32)


def relevance_mass(maps, masks) -> np.ndarray:
    """Share of the positive relevance inside the mask (Arras et al., 2022): sum of max(map, 0)
    in the mask / in the whole map. NaN for an empty mask or an all-zero map. Returns (N,) float32."""
    m, mk = _resized(maps, masks)
    pos = np.clip(m, 0, None).reshape(len(m), -1)
    mk = mk.astype(bool).reshape(len(mk), -1)
    tot = pos.sum(1)
    out = np.where(tot > 0, (pos * mk).sum(1) / np.where(tot > 0, tot, 1), np.nan).astype(np.float32)
    out[~mk.any(1)] = np.nan
    return out


def relevance_rank(maps, masks) -> np.ndarray:
    """Share of the K most relevant pixels that lie inside the mask, K = the mask's size (Arras et
    al., 2022). Ties broken by pixel order. NaN for an empty mask. Returns (N,) float32."""
    m, mk = _resized(maps, masks)
    flat = m.reshape(len(m), -1)
    mk = mk.astype(bool).reshape(len(mk), -1)
    out = np.full(len(m), np.nan, np.float32)
    for i in range(len(m)):
        k = int(mk[i].sum())
        if k == 0:
            continue
        top = np.argsort(-flat[i], kind="stable")[:k]
        out[i] = mk[i, top].mean()
    return out


def iou_coverage(maps, masks, *, threshold: float = 0.5) -> dict[str, np.ndarray]:
    """IoU and coverage of the map thresholded at ``threshold`` (after per-map min-max to [0, 1]).

    Returns
    -------
    dict of (N,) float32: ``iou`` = |S ∩ M| / |S ∪ M|, ``coverage`` = |S ∩ M| / |M| (how much of the
    annotated region the map covers), ``precision`` = |S ∩ M| / |S|; NaN for an empty mask.
    """
    m, mk = _resized(maps, masks)
    s = minmax_maps(m).reshape(len(m), -1) >= threshold
    mk = mk.astype(bool).reshape(len(mk), -1)
    inter = (s & mk).sum(1).astype(np.float64)
    union = (s | mk).sum(1)
    msize = mk.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / union, np.nan)
        cov = np.where(msize > 0, inter / msize, np.nan)
        prec = np.where(s.sum(1) > 0, inter / s.sum(1), np.nan)
    empty = msize == 0
    iou[empty] = np.nan
    prec[empty] = np.nan
    return {"iou": iou.astype(np.float32), "coverage": cov.astype(np.float32), "precision": prec.astype(np.float32)}
