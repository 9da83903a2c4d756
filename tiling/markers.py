"""Pen-marker strokes with known geometry, drawn over real tissue.

Used to test the ink detector (the exact stroke polygons give the ground truth), to build the
demo cohort and, later, to plant ink shortcuts. A marker is semi-transparent dye: by the
Beer-Lambert law it multiplies the transmitted light, so a stroke of density ``d`` over a pixel
``I`` gives ``I * (C / 255) ** (d * coverage)`` per channel, where ``C`` is the marker's colour
on glass at full density and ``coverage`` the pixel's share inside the stroke (anti-aliased).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["MARKER_COLOURS", "Stroke", "random_strokes", "render_strokes", "stroke_coverage"]

#: RGB of each marker on glass at full density (typical slide-marker dyes: a bright blue, a
#: green, a near-black and a red that absorbs green and blue alike)
MARKER_COLOURS: dict[str, tuple[int, int, int]] = {
    "blue": (30, 90, 200),
    "green": (40, 150, 90),
    "black": (35, 35, 40),
    "red": (220, 35, 35),
}


@dataclass(frozen=True)
class Stroke:
    """One marker stroke.

    Attributes
    ----------
    polygon : shapely Polygon
        Outline in pixels of the image it is drawn on (x right, y down).
    colour : str
        A key of :data:`MARKER_COLOURS`.
    density : float
        Dye density in (0, 1]: 1 = the marker's full colour on glass.
    width_um : float
        Width of the stroke in µm.
    """

    polygon: object
    colour: str
    density: float
    width_um: float


def random_strokes(
    rng: np.random.Generator,
    shape: tuple[int, int],
    *,
    mpp: float,
    n: int = 4,
    colours: tuple[str, ...] = tuple(MARKER_COLOURS),
    width_mm: tuple[float, float] = (0.3, 2.0),
    length_mm: tuple[float, float] = (2.0, 5.0),
    density: tuple[float, float] = (0.4, 0.9),
    gap_um: float = 100.0,
    region=None,
) -> list[Stroke]:
    """Smooth random marker strokes that do not touch each other.

    Parameters
    ----------
    rng : numpy Generator
    shape : (H, W)
        Image size in pixels.
    mpp : float
        µm per pixel of the image.
    n : int
        Number of strokes; colours cycle through ``colours``.
    width_mm, length_mm, density : (low, high)
        Uniform ranges of each stroke's width, length and dye density.
    gap_um : float
        Strokes keep at least this distance from each other (overlapping dyes mix into other colours).
    region : shapely geometry, optional
        Each stroke starts inside it (e.g. the tissue), so that it crosses tissue.

    Returns
    -------
    list of Stroke (fewer than ``n`` only if no room was found after many tries).
    """
    from shapely.geometry import LineString, Point

    H, W = shape
    out: list[Stroke] = []
    tries = 0
    while len(out) < n and tries < 50 * n:
        tries += 1
        if region is not None:
            minx, miny, maxx, maxy = region.bounds
            x, y = rng.uniform(minx, maxx), rng.uniform(miny, maxy)
            if not region.contains(Point(x, y)):
                continue
        else:
            x, y = rng.uniform(0.1, 0.9) * W, rng.uniform(0.1, 0.9) * H
        angle = rng.uniform(0, 2 * np.pi)
        step = max(20.0 / mpp, 1.0)  # a point every 20 µm
        pts = [(x, y)]
        for _ in range(int(rng.uniform(*length_mm) * 1000 / mpp / step)):
            angle += rng.normal(scale=0.03)
            x, y = x + np.cos(angle) * step, y + np.sin(angle) * step
            pts.append((x, y))
        width = rng.uniform(*width_mm) * 1000
        poly = LineString(pts).buffer(width / mpp / 2, cap_style="round")
        if any(poly.buffer(gap_um / mpp).intersects(s.polygon) for s in out):
            continue
        out.append(Stroke(poly, colours[len(out) % len(colours)], float(rng.uniform(*density)), float(width)))
    return out


def stroke_coverage(polygons, shape: tuple[int, int], *, scale: float = 1.0, supersample: int = 4) -> np.ndarray:
    """Share of each pixel inside the union of ``polygons``.

    Parameters
    ----------
    polygons : iterable of shapely polygons
        In pixels of the drawing image.
    shape : (h, w)
        Output grid; each output pixel is ``scale`` drawing pixels wide.
    supersample : int
        Sub-pixels per output pixel edge.

    Returns
    -------
    (h, w) float32 in [0, 1].
    """
    import shapely
    from PIL import Image, ImageDraw

    h, w = shape
    union = shapely.union_all(list(polygons))
    im = Image.new("L", (w * supersample, h * supersample), 0)
    draw = ImageDraw.Draw(im)
    k = supersample / scale
    for g in getattr(union, "geoms", [union]):
        if g.is_empty:
            continue
        draw.polygon([tuple(p) for p in np.asarray(g.exterior.coords) * k], fill=1)
        for hole in g.interiors:
            draw.polygon([tuple(p) for p in np.asarray(hole.coords) * k], fill=0)
    return np.asarray(im, np.float32).reshape(h, supersample, w, supersample).mean(axis=(1, 3))


def render_strokes(image: np.ndarray, strokes: list[Stroke], *, supersample: int = 2) -> np.ndarray:
    """Draw the strokes on a copy of ``image`` (H, W, 3) uint8 (Beer-Lambert, see the module doc).
    Each stroke touches only its bounding box."""
    out = np.array(image, dtype=np.uint8)[..., :3]
    H, W = out.shape[:2]
    for s in strokes:
        x0, y0, x1, y1 = s.polygon.bounds
        x0, y0 = max(int(np.floor(x0)), 0), max(int(np.floor(y0)), 0)
        x1, y1 = min(int(np.ceil(x1)) + 1, W), min(int(np.ceil(y1)) + 1, H)
        if x1 <= x0 or y1 <= y0:
            continue
        from shapely import affinity

        local = affinity.translate(s.polygon, -x0, -y0)
        cov = stroke_coverage([local], (y1 - y0, x1 - x0), supersample=supersample)
        od = -np.log10(np.asarray(MARKER_COLOURS[s.colour], np.float32) / 255.0)
        box = out[y0:y1, x0:x1].astype(np.float32) * 10.0 ** (-(cov[..., None] * s.density) * od[None, None, :])
        out[y0:y1, x0:x1] = np.clip(np.rint(box), 0, 255).astype(np.uint8)
    return out
