"""Views and exports of a run: GeoJSON for QuPath (the Bokeh explorer and reports are to come).

Works on DataFrames only (no torch, no wsi_explain).
"""

from .geojson import cluster_colours, tiles_to_geojson, write_geojson

__all__ = ["cluster_colours", "tiles_to_geojson", "write_geojson"]
