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
from .ink import InkResult, InkRules, detect_ink
from .markers import MARKER_COLOURS, Stroke, random_strokes, render_strokes, stroke_coverage
from .qc import QC_COLUMNS, compute_tile_qc, sharpness, tile_measures
from .readers import ArrayReader, OpenSlideReader, SlideInfo, SlideReader, open_slide
from .stain import StainVectors, estimate_stains, glass_level, optical_density, standard_stains
from .thumbnail import grid_thumbnail
from .tiffreader import TiffTileReader
from .tissue import MASK_CODES, TissueMask, detect_tissue, tissue_mask_from_rgb
from .writer import write_pyramidal_tiff, write_svs, write_tiled_tiff

__all__ = [
    "AnnotationError",
    "Annotations",
    "ArrayReader",
    "GridError",
    "InkResult",
    "InkRules",
    "MARKER_COLOURS",
    "MASK_CODES",
    "QC_COLUMNS",
    "StainVectors",
    "Stroke",
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
    "TiffTileReader",
    "TissueMask",
    "compute_tile_qc",
    "detect_ink",
    "detect_tissue",
    "estimate_stains",
    "geojson_label_fractions",
    "geojson_tile_masks",
    "glass_level",
    "grid_thumbnail",
    "label_column",
    "make_grid",
    "mask_label_fractions",
    "mask_tile_labels",
    "open_slide",
    "optical_density",
    "random_strokes",
    "read_geojson",
    "read_label_mask",
    "read_tile",
    "render_strokes",
    "sharpness",
    "standard_stains",
    "stroke_coverage",
    "tile_measures",
    "tile_boxes",
    "tissue_mask_from_rgb",
    "write_pyramidal_tiff",
    "write_svs",
    "write_tiled_tiff",
]
