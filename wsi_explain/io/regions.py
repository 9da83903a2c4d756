"""Per-tile region masks from a slide's annotations: the region a segmentation model's
``region="annotation"`` target sums its class logit over (GeoJSON polygons or a label mask, as the
tile stage recorded them in the tile table's metadata)."""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["AnnotationRegions"]


class AnnotationRegions:
    """The annotated area under each tile of one slide, rasterised at the model's input size.

    Parameters
    ----------
    meta : dict
        The tile table's metadata (``annotations`` GeoJSON path or ``label_mask`` path with
        ``label_classes``, ``level0_dimensions``, ``slide_path``).
    labels : tuple of str
        Annotation classes whose union is the region (matched as the tile stage's label columns:
        case-insensitive); empty = every annotated class (a label mask's class 0 is background).

    Raises
    ------
    tiling.AnnotationError
        The slide has no annotations or label mask (naming the slide), or they cannot be read.
    """

    def __init__(self, meta: dict, labels: tuple[str, ...] = ()) -> None:
        import tiling

        self.meta, self.ann, self.mask, self.classes = meta, None, None, {}
        self.labels = {tiling.label_column(lab) for lab in labels}
        if meta.get("annotations"):
            self.ann = tiling.read_geojson(meta["annotations"])
        elif meta.get("label_mask"):
            self.mask = tiling.read_label_mask(meta["label_mask"])
            names = meta.get("label_classes") or {}
            self.classes = {int(i): names.get(str(int(i)), f"class_{int(i)}") for i in np.unique(self.mask) if i != 0}
        else:
            raise tiling.AnnotationError(
                meta.get("slide_path", "?"),
                'the region target "annotation" needs the slide\'s annotations or label mask '
                "(give them to `wsi-explain tile` with --annotations)",
            )

    def class_masks(self, tiles: pd.DataFrame, px: int) -> dict[str, np.ndarray]:
        """{annotation class: (n, px, px) bool} under each tile (rows of the slide's tile table,
        level-0 geometry), at ``px`` pixels per tile edge; every class (a label mask's background,
        class 0, is none)."""
        import tiling

        if self.ann is not None:
            return tiling.geojson_tile_masks(tiles, self.ann, px=px)
        dims = tuple(self.meta["level0_dimensions"])
        lab = tiling.mask_tile_labels(tiles, self.mask, slide_dimensions=dims, px=px)
        return {name: lab == i for i, name in self.classes.items()}

    def masks(self, tiles: pd.DataFrame, px: int, labels: tuple[str, ...] | None = None) -> np.ndarray:
        """(n, px, px) bool: the annotated area of the chosen classes (``labels``, default the
        instance's) under each tile, at ``px`` pixels per tile edge."""
        import tiling

        chosen = self.labels if labels is None else {tiling.label_column(lab) for lab in labels}
        out = np.zeros((len(tiles), px, px), bool)
        if not len(tiles):
            return out
        for name, mk in self.class_masks(tiles, px).items():
            if not chosen or tiling.label_column(name) in chosen:
                out |= mk
        return out
