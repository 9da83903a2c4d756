"""Views and exports of a run: the linked Bokeh explorer, report pages, plots, tile overlays
and GeoJSON for QuPath.

Works on DataFrames, arrays and paths only (no torch, no wsi_explain).
"""

from .colours import categorical_colours, colour_column, continuous_colours
from .explorer import GALLERY_CSS, ExplorerParts, escape, explorer_layout, js_string
from .geojson import cluster_colours, tiles_to_geojson, write_geojson
from .overlay import cam_overlay, jet, stitch_heatmap, tile_strip, to_jpeg, to_png
from .plots import metric_table_html, removal_plot, sanity_plot, spread_plot, table_html
from .report import BOKEH_JS, PAGE_CSS, copy_bokeh_js, render_page

__all__ = [
    "BOKEH_JS",
    "ExplorerParts",
    "GALLERY_CSS",
    "PAGE_CSS",
    "cam_overlay",
    "categorical_colours",
    "cluster_colours",
    "colour_column",
    "continuous_colours",
    "copy_bokeh_js",
    "escape",
    "explorer_layout",
    "jet",
    "js_string",
    "metric_table_html",
    "removal_plot",
    "render_page",
    "sanity_plot",
    "spread_plot",
    "stitch_heatmap",
    "table_html",
    "tile_strip",
    "tiles_to_geojson",
    "to_jpeg",
    "to_png",
    "write_geojson",
]
