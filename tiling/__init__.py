"""Slide access and tile geometry: readers, tissue detection, the mpp-aware grid, annotations.

``import tiling`` stays light: no torch, and OpenSlide is imported when a slide is opened.
"""

from .annotations import (
    PANDA_KAROLINSKA,
    PANDA_RADBOUD,
    Annotations,
    geojson_label_fractions,
    geojson_tile_masks,
    label_column,
    mask_label_fractions,
    mask_tile_labels,
    read_geojson,
    read_label_mask,
)
from .errors import (
    AnnotationError,
    GridError,
    MissingMppError,
    NoTissueError,
    SlideError,
    SlideNotFoundError,
    SlideOpenError,
    TileReadError,
)
from .grid import TILE_COLUMNS, GridSpec, make_grid, read_tile, tile_boxes
from .readers import ArrayReader, OpenSlideReader, SlideInfo, SlideReader, open_slide
from .thumbnail import grid_thumbnail
from .tissue import TissueMask, detect_tissue, tissue_mask_from_rgb
from .writer import write_pyramidal_tiff, write_svs, write_tiled_tiff

__all__ = [
    "AnnotationError",
    "Annotations",
    "ArrayReader",
    "GridError",
    "GridSpec",
    "MissingMppError",
    "NoTissueError",
    "OpenSlideReader",
    "PANDA_KAROLINSKA",
    "PANDA_RADBOUD",
    "SlideError",
    "SlideInfo",
    "SlideNotFoundError",
    "SlideOpenError",
    "SlideReader",
    "TILE_COLUMNS",
    "TileReadError",
    "TissueMask",
    "detect_tissue",
    "geojson_label_fractions",
    "geojson_tile_masks",
    "grid_thumbnail",
    "label_column",
    "make_grid",
    "mask_label_fractions",
    "mask_tile_labels",
    "open_slide",
    "read_geojson",
    "read_label_mask",
    "read_tile",
    "tile_boxes",
    "tissue_mask_from_rgb",
    "write_pyramidal_tiff",
    "write_svs",
    "write_tiled_tiff",
]
