"""Optical density and the slide's own haematoxylin and eosin stain vectors.

H&E is a two-stain mixture seen in transmitted light: by the Beer-Lambert law the optical
density (OD) of a pixel, ``-log10(I / I_glass)`` per channel, is a non-negative combination
of the haematoxylin and eosin OD vectors. Colour that such a combination cannot explain (a
large residual) is what pen ink and other foreign dyes look like.

The vectors are estimated per slide in the spirit of Macenko et al. (2009), made robust to ink:
pixels that no H&E stain can produce are left out first, the stain plane is fitted by trimmed
least squares starting from scikit-image's standard H&E vectors (``skimage.color.rgb_from_hed``),
and the two vectors are taken at Tukey fences of the pixels' angles in that plane (not at their
extremes, which pen ink would own). With too few tissue pixels, the standard vectors are used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

__all__ = ["StainVectors", "standard_stains", "estimate_stains", "optical_density", "glass_level", "od_lut"]

logger = logging.getLogger(__name__)

#: pixels whose summed OD is below this are glass (or nearly): they say nothing about the stains
FOREGROUND_OD = 0.3


def _unit(v) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


def _angle(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip(_unit(a) @ _unit(b), -1.0, 1.0))))


@dataclass(frozen=True)
class StainVectors:
    """Unit OD vectors of haematoxylin and eosin, and the glass intensity OD is measured against.

    Attributes
    ----------
    h, e : (3,) float64
        Unit optical-density vectors (R, G, B) of haematoxylin and eosin.
    glass : (3,) float64
        RGB intensity of empty glass (0-255), ``I_glass`` in ``OD = -log10(I / I_glass)``.
    source : str
        ``"estimated"`` from the slide, or ``"standard"`` (scikit-image's H&E vectors) with the reason.
    """

    h: np.ndarray
    e: np.ndarray
    glass: np.ndarray
    source: str = "standard"

    @property
    def matrix(self) -> np.ndarray:
        """(3, 2) columns H, E."""
        return np.stack([self.h, self.e], axis=1)

    def concentrations(self, od: np.ndarray) -> np.ndarray:
        """Least-squares H and E amounts (OD units along each unit vector) of ``od`` (..., 3) -> (..., 2)."""
        return np.asarray(od, np.float64) @ np.linalg.pinv(self.matrix).T

    def residual(self, od: np.ndarray) -> np.ndarray:
        """Distance (OD units) of each OD vector (..., 3) from the cone of non-negative H, E mixtures.

        Inside the cone this is the distance to the H-E plane; where the least-squares mixture
        needs a negative amount of one stain (blue ink "beyond" haematoxylin, say) it is the
        distance to the other stain's ray. Returns (...) float32.
        """
        v = np.asarray(od, np.float32).reshape(-1, 3)
        P = np.linalg.pinv(self.matrix).astype(np.float32)  # (2, 3)
        c = v @ P.T
        sq = np.einsum("ij,ij->i", v, v)
        # |v|^2 - |projection|^2: the squared distance to the plane (S has unit columns, so the
        # projection's squared length is c^T G c with G the 2x2 Gram matrix)
        G = (self.matrix.T @ self.matrix).astype(np.float32)
        proj = G[0, 0] * c[:, 0] ** 2 + 2 * G[0, 1] * c[:, 0] * c[:, 1] + G[1, 1] * c[:, 1] ** 2
        out = sq - proj
        # outside the cone the nearest non-negative mixture lies on one of the two stain rays
        outside = (c[:, 0] < 0) | (c[:, 1] < 0)
        if outside.any():
            vo = v[outside]
            rays = [
                np.einsum("ij,ij->i", vo, vo) - np.clip(vo @ u.astype(np.float32), 0, None) ** 2
                for u in (self.h, self.e)
            ]
            out[outside] = np.minimum(*rays)
        return np.sqrt(np.maximum(out, 0)).reshape(np.shape(od)[:-1]).astype(np.float32)

    def to_dict(self) -> dict:
        return {
            "h": [round(float(x), 5) for x in self.h],
            "e": [round(float(x), 5) for x in self.e],
            "glass": [round(float(x), 2) for x in self.glass],
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, d: dict) -> StainVectors:
        return cls(
            np.asarray(d["h"], np.float64),
            np.asarray(d["e"], np.float64),
            np.asarray(d.get("glass", (255, 255, 255)), np.float64),
            d.get("source", "standard"),
        )


def standard_stains(glass=(255.0, 255.0, 255.0), reason: str = "") -> StainVectors:
    """scikit-image's H&E vectors (Ruifrok & Johnston), as unit OD vectors."""
    from skimage.color import rgb_from_hed

    src = "standard" + (f" ({reason})" if reason else "")
    return StainVectors(_unit(rgb_from_hed[0]), _unit(rgb_from_hed[1]), np.asarray(glass, np.float64), src)


def glass_level(rgb: np.ndarray, *, min_share: float = 0.01) -> np.ndarray:
    """RGB of empty glass: the median of bright, near-neutral pixels (all channels >= 215), or
    white (255) when fewer than ``min_share`` of the pixels are such (a field that is all tissue)."""
    rgb = np.asarray(rgb)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    lo = np.minimum(np.minimum(r, g), b)
    hi = np.maximum(np.maximum(r, g), b)
    sel = (lo >= 215) & (hi.astype(np.int16) - lo <= 25)
    n = int(sel.sum())
    if n < max(min_share * sel.size, 16):
        return np.array([255.0, 255.0, 255.0])
    return np.array([np.median(c[sel]) for c in (r, g, b)], np.float64)


def od_lut(glass) -> np.ndarray:
    """(3, 256) float32 table: OD of each 8-bit value per channel against ``glass`` (clipped at 0)."""
    v = np.maximum(np.arange(256, dtype=np.float64), 1.0)
    g = np.asarray(glass, np.float64)[:, None]
    return np.maximum(-np.log10(v[None, :] / g), 0.0).astype(np.float32)


def optical_density(rgb: np.ndarray, glass=(255.0, 255.0, 255.0)) -> np.ndarray:
    """Optical density ``max(0, -log10(I / I_glass))`` of an (..., 3) RGB image, float32.

    uint8 input goes through a lookup table (fast); float input (block averages) is computed directly.
    """
    rgb = np.asarray(rgb)
    if rgb.dtype == np.uint8:
        lut = od_lut(glass)
        return np.stack([lut[c][rgb[..., c]] for c in range(3)], axis=-1)
    g = np.asarray(glass, np.float32)
    return np.maximum(-np.log10(np.maximum(rgb.astype(np.float32), 1.0) / g), 0.0)


def _never_h_and_e(od: np.ndarray) -> np.ndarray:
    """Pixels no H&E mixture can produce, under a broad physical prior: both stains absorb green
    at least as much as blue and nearly as much as red (so green and red markers, and red ink
    absorbing blue as much as green, fail), and stained tissue is never dark and grey (black ink)."""
    r, g, b = od[:, 0], od[:, 1], od[:, 2]
    mean = (r + g + b) / 3
    spread = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    return (r > 1.6 * g) | (b > 0.9 * g) | ((mean > 0.55) & (spread < 0.25 * mean))


def estimate_stains(
    od: np.ndarray,
    *,
    glass=(255.0, 255.0, 255.0),
    foreground: np.ndarray | None = None,
    min_pixels: int = 200,
    keep: float = 0.7,
    iterations: int = 4,
    fence: float = 1.5,
    max_sample: int = 200_000,
    seed: int = 0,
) -> StainVectors:
    """The slide's own H and E vectors from its OD image (robust Macenko).

    Parameters
    ----------
    od : (h, w, 3) float32
        Optical density of the low-resolution image (see :func:`optical_density`). Not modified.
    glass : (3,)
        The glass RGB the OD was computed against (stored with the result).
    foreground : (h, w) bool, optional
        Pixels to use (default: summed OD above :data:`FOREGROUND_OD`).
    min_pixels : int
        With fewer usable pixels, the standard vectors are returned.
    keep : float
        Share of pixels closest to the plane kept at each trimmed refit.
    fence : float
        H and E sit at ``q25 - fence * IQR`` and ``q75 + fence * IQR`` of the pixels' angles in the
        plane (clipped to their 0.5th and 99.5th percentiles).

    Returns
    -------
    StainVectors (``source`` says ``"estimated"`` or why the standard vectors were used).
    """
    od = np.asarray(od, np.float32)
    fg = (od.sum(axis=-1) > FOREGROUND_OD) if foreground is None else np.asarray(foreground, bool)
    pts = od[fg].astype(np.float64)
    if len(pts) > max_sample:
        pts = pts[np.random.default_rng(seed).choice(len(pts), max_sample, replace=False)]
    pts = pts[~_never_h_and_e(pts)]
    if len(pts) < min_pixels:
        return standard_stains(glass, f"{len(pts)} stained pixels, fewer than {min_pixels}")
    std = standard_stains(glass)
    normal = _unit(np.cross(std.h, std.e))
    inliers = pts
    vecs = None
    for _ in range(iterations):  # trimmed least squares: the plane through the origin closest to most pixels
        d = np.abs(pts @ normal)
        inliers = pts[d <= np.quantile(d, keep)]
        _, vecs = np.linalg.eigh(inliers.T @ inliers / len(inliers))
        normal = vecs[:, 0]
    e1 = vecs[:, 2] * np.sign(vecs[:, 2].sum())
    e2 = np.cross(normal, e1)
    phi = np.arctan2(inliers @ e2, inliers @ e1)
    q25, q75, p_lo, p_hi = np.percentile(phi, [25, 75, 0.5, 99.5])
    lo, hi = max(p_lo, q25 - fence * (q75 - q25)), min(p_hi, q75 + fence * (q75 - q25))
    a, b = np.cos(lo) * e1 + np.sin(lo) * e2, np.cos(hi) * e1 + np.sin(hi) * e2
    # haematoxylin absorbs red relative to green more than eosin does
    h, e = (a, b) if a[0] / max(a[1], 1e-6) > b[0] / max(b[1], 1e-6) else (b, a)
    if _angle(h, std.h) > 40 or _angle(e, std.e) > 50 or _angle(h, e) < 3:
        return standard_stains(
            glass,
            f"implausible estimate: H {_angle(h, std.h):.0f}° and E {_angle(e, std.e):.0f}° from the standard vectors",
        )
    return StainVectors(_unit(h), _unit(e), np.asarray(glass, np.float64), "estimated")
