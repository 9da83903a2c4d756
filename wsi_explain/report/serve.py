"""The explorer as a Bokeh server app (``wsi-explain serve``), bound to 127.0.0.1 by default.

Besides the Bokeh document at ``/explorer`` the server answers ``/tiles/<slide>/<tile>.png``
(query: ``method`` = a stored map, ``none`` or ``all``; ``size`` in px, 0 = the tile's own): the
tile is cut from the slide on demand, overlaid and cached under ``<run>/cache/tiles``. Slide and
tile ids must belong to the clustered cohort, so nothing outside the run folder is ever served.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["make_server", "explorer_document", "deep_zoom_sources", "deep_zoom_handler", "DEEP_ZOOM_ROUTE"]

logger = logging.getLogger(__name__)

#: the deep-zoom route: slide, layer, heat-map method (optional), zoom, x, y
DEEP_ZOOM_ROUTE = r"/dz/([^/]+)/(tissue|qc|heat)/(?:([^/]+)/)?(\d+)/(\d+)/(\d+)\.(?:jpg|png)"


def _tile_handler():
    from tornado.web import HTTPError, RequestHandler

    from wsi_explain.io.tile_images import TileImageError

    class TileHandler(RequestHandler):
        def initialize(self, images) -> None:
            self.images = images

        def get(self, slide_id: str, tile_id: str) -> None:
            try:
                size = int(self.get_argument("size", "128"))
                data = self.images.png(slide_id, int(tile_id), method=self.get_argument("method", "none"), size=size)
            except (TileImageError, ValueError) as exc:
                raise HTTPError(404, reason="not found") from exc
            self.set_header("Content-Type", "image/png")
            self.set_header("Cache-Control", "max-age=3600")
            self.write(data)

    return TileHandler


def deep_zoom_handler():
    """``/dz/<slide>/<layer>/<z>/<x>/<y>.<ext>``: tissue JPEGs and heat-map / QC PNGs of the deep-zoom
    pyramid, cut in a thread pool (the server keeps answering while tiles are read)."""
    from tornado.ioloop import IOLoop
    from tornado.web import HTTPError, RequestHandler

    from wsi_explain.io.tile_images import TileImageError

    class DeepZoomHandler(RequestHandler):
        def initialize(self, pyramid, overlays, pool) -> None:
            self.pyramid, self.overlays, self.pool = pyramid, overlays, pool

        def _tile(self, sid: str, layer: str, method: str, z: str, x: str, y: str) -> bytes:
            if max(len(z), len(x), len(y)) > 6:
                raise TileImageError("tile coordinates out of range")
            if layer == "tissue":
                return self.pyramid.tissue(sid, int(z), int(x), int(y))
            return self.overlays.tile(layer, sid, int(z), int(x), int(y), method=method)

        async def get(self, sid: str, layer: str, method: str | None, z: str, x: str, y: str) -> None:
            try:
                data = await IOLoop.current().run_in_executor(self.pool, self._tile, sid, layer, method or "", z, x, y)
            except (TileImageError, ValueError, OSError) as exc:  # bad URL, or a slide that cannot be read
                raise HTTPError(404, reason="not found") from exc
            self.set_header("Content-Type", "image/jpeg" if data[:2] == b"\xff\xd8" else "image/png")
            self.set_header("Cache-Control", "max-age=3600")
            self.write(data)

    return DeepZoomHandler


def _load(run_path: Path) -> dict:
    import pyarrow.parquet as pq

    from wsi_explain.io.tile_table import read_tile_table
    from wsi_explain.report.names import read_cluster_names

    cdir = run_path / "cohort"
    from wsi_explain.report.explorer_inputs import with_mil

    tiles = with_mil(pd.read_parquet(cdir / "tiles.parquet"), run_path)
    meta = json.loads(pq.read_schema(cdir / "tiles.parquet").metadata[b"wsi_explain"])
    if (cdir / "tile_metrics.parquet").exists():
        tm = pd.read_parquet(cdir / "tile_metrics.parquet")
        keep = [c for c in tm.columns if ":" in c and tm[c].notna().any()]
        tiles = tiles.merge(tm[["slide_id", "tile_id"] + keep], on=["slide_id", "tile_id"], how="left")
    clusters = pd.read_parquet(cdir / "clusters.parquet")
    slides = {}
    for sid in sorted(tiles["slide_id"].unique()):
        _, m = read_tile_table(run_path / "slides" / sid / "tiles.parquet")
        W, H = m["level0_dimensions"]
        slides[sid] = {"url": f"/overview/{sid}.png", "width": int(W), "height": int(H)}
    doc = read_cluster_names(run_path)
    return {
        "tiles": tiles,
        "clusters": clusters,
        "slides": slides,
        "cam": meta.get("cam_method") or "gradcam",
        "names": {int(k): v for k, v in doc["names"].items()},
        "comments": {int(k): v for k, v in doc["comments"].items()},
        "verdicts": {int(k): v for k, v in doc["verdicts"].items()},
    }


def _deep_zoom_spec(pyramid, methods: list[str]) -> dict:
    """The deep-zoom pyramid as the explorer's slide panel sees it (URLs of this server's routes)."""
    return {
        "zmax": pyramid.zmax,
        "tile_px": pyramid.tile_px,
        # the cache version in the URLs: a browser never shows tiles of an earlier run from its cache
        "tissue_url": "/dz/{slide}/tissue/{Z}/{X}/{Y}.jpg?v=" + pyramid.version,
        "heat_url": "/dz/{slide}/heat/{method}/{Z}/{X}/{Y}.png?v=" + pyramid.version,
        "qc_url": "/dz/{slide}/qc/{Z}/{X}/{Y}.png?v=" + pyramid.version,
        "methods": methods,
    }


def _explorer_parts(d: dict, run_path: Path, images, pyramid=None):
    """The linked explorer of the run's data ``d`` (tiles served by this server's routes; the slide
    panel zooms to level 0 when ``pyramid`` is given)."""
    import viz
    from wsi_explain.report.explorer_inputs import cluster_table, colour_options, with_errors

    tiles, clusters, cam = with_errors(d["tiles"]), d["clusters"], d["cam"]
    colour_by = colour_options(tiles, metric_columns=[c for c in tiles.columns if ":" in c])
    methods = [cam] + [m for m in images.methods(tiles["slide_id"].iloc[0]) if m != cam]
    metrics_path = run_path / "cohort" / "cluster_metrics.parquet"
    keys = [
        (cam, m, m)
        for m in ("deletion_auc_blur", "deletion_auc_constant", "road_combined", "pointing_game", "sanity_spearman")
    ]
    clusters, table_columns = cluster_table(
        clusters,
        pd.read_parquet(metrics_path) if metrics_path.exists() else None,
        keys + [("model", "removal_mean_abs_d_mean", "removal |Δ score|")],
    )
    sort_by = {"membership": "membership", "confidence": "confidence", "probability": "prob_pos"}
    if "cam_off_tissue" in tiles.columns:
        sort_by["attribution off tissue"] = "cam_off_tissue"
    slides, zoom = d["slides"], None
    if pyramid is not None:
        slides = {
            k: {**v, "mpp": pyramid.slides[k].mpp, "problem": viz.escape(pyramid.problem(k) or "")}
            for k, v in slides.items()
        }
        zoom = _deep_zoom_spec(pyramid, methods)
    return viz.explorer_layout(
        tiles,
        clusters,
        slides=slides,
        deep_zoom=zoom,
        colour_by=colour_by,
        thumb_template="/tiles/{slide}/{tile}.png?method={method}&size=96",
        full_template="/tiles/{slide}/{tile}.png?method=all&size=0",
        methods=methods,
        names=d["names"],
        sort_by=sort_by,
        hover_img=f"/tiles/@slide_id/@tile_id.png?method={cam}&size=96",
        table_columns=table_columns,
    )


def _relabel(parts, c: int, label: str) -> None:
    """Show cluster ``c``'s new name in the cluster table and on its tiles' hover."""
    cs = dict(parts.cluster_source.data)
    cs["name"] = [label if int(k) == c else v for k, v in zip(cs["cluster"], cs["name"])]
    parts.cluster_source.data = cs
    cname = np.asarray(parts.source.data["cname"], object).copy()
    cname[np.asarray(parts.source.data["cluster"]) == c] = label
    parts.source.data["cname"] = cname


def _naming_panel(d: dict, run_path: Path, parts):
    """Cluster naming: pick a cluster (or click its table row), write a name and a comment, choose a
    verdict, save (versioned, in ``cohort/cluster_names.json``) -> (row of inputs, status Div)."""
    from bokeh.layouts import column, row
    from bokeh.models import Button, Div, Select, TextAreaInput, TextInput

    import viz
    from wsi_explain.report.names import VERDICTS, save_cluster_name

    ids = [str(c) for c in parts.cluster_source.data["cluster"]]
    pick = Select(title="Cluster to name", value=ids[0], options=ids, name="name_cluster")
    first = int(ids[0])
    name_in = TextInput(title="Name", placeholder="cluster name", value=d["names"].get(first, ""), name="name_input")
    comment_in = TextAreaInput(
        title="Comment", placeholder="comment", value=d["comments"].get(first, ""), rows=2, name="comment_input"
    )
    options = ["(none)", *VERDICTS]
    verdict_in = Select(title="Verdict", value=d["verdicts"].get(first) or "(none)", options=options, name="verdict")
    save = Button(label="Save name", button_type="primary", name="save_name")
    status = Div(text="", name="name_status")

    def on_pick(attr, old, new):
        name_in.value = d["names"].get(int(new), "")
        comment_in.value = d["comments"].get(int(new), "")
        verdict_in.value = d["verdicts"].get(int(new)) or "(none)"

    def on_table(attr, old, new):
        if new:
            pick.value = str(parts.cluster_source.data["cluster"][new[0]])

    def on_save():
        c = int(pick.value)
        try:
            verdict = "" if verdict_in.value == "(none)" else verdict_in.value
            saved = save_cluster_name(run_path, c, name_in.value, comment_in.value, verdict=verdict)
        except Exception as exc:  # shown to the user; the server keeps running
            status.text = viz.escape(f"not saved: {exc}")
            return
        d["names"] = {int(k): v for k, v in saved["names"].items()}
        d["comments"] = {int(k): v for k, v in saved["comments"].items()}
        d["verdicts"] = {int(k): v for k, v in saved["verdicts"].items()}
        label = d["names"].get(c, "noise" if c < 0 else f"cluster {c}")
        _relabel(parts, c, label)
        v = d["verdicts"].get(c, "no verdict")
        status.text = viz.escape(f"saved cluster {c} as {label!r}, {v} (names version {saved['version']})")

    pick.on_change("value", on_pick)
    parts.cluster_source.selected.on_change("indices", on_table)
    save.on_click(on_save)
    return row(pick, name_in, comment_in, verdict_in, column(Div(text=""), save)), status


def explorer_document(doc, run_path: Path, images, *, pyramid=None) -> None:
    """Fill a Bokeh document with the explorer of a run, plus "find similar" and cluster naming
    (with deep zoom over ``pyramid``, a :class:`~wsi_explain.io.deepzoom.DeepZoomTiles`)."""
    from bokeh.layouts import column
    from bokeh.models import Div

    import viz
    from wsi_explain.report.similar import similar_panel

    title = Div(text=f"<h2>wsi-explain explorer: {viz.escape(run_path.name)}</h2>")
    doc.title = "wsi-explain explorer"
    try:
        d = _load(run_path)
        parts = _explorer_parts(d, run_path, images, pyramid)
        naming, status = _naming_panel(d, run_path, parts)
        similar, similar_status = similar_panel(parts, run_path, d)
    except Exception as exc:  # the page says what went wrong instead of leaving the browser waiting
        logger.exception("%s: the explorer could not be built", run_path)
        msg = f"{type(exc).__name__}: {exc}"
        doc.add_root(column(title, Div(text=f"<p>The explorer could not be built: {viz.escape(msg)}</p>")))
        return
    doc.add_root(column(title, parts.layout, similar, similar_status, naming, status))


def deep_zoom_sources(run_path: Path, slide_ids: list[str]):
    """The run's deep-zoom pyramid and overlay layers -> (DeepZoomTiles, OverlayTiles)."""
    from wsi_explain.io.deepzoom import DeepZoomTiles
    from wsi_explain.io.deepzoom_layers import OverlayTiles

    pyramid = DeepZoomTiles.from_run(run_path, slide_ids)
    tiles = pd.read_parquet(run_path / "cohort" / "tiles.parquet")
    return pyramid, OverlayTiles(run_path, pyramid, tiles)


def make_server(
    run_path: str | Path, *, port: int = 5006, address: str = "127.0.0.1", allow_origin: list[str] | None = None
):
    """A Bokeh server with the explorer at ``/explorer`` (not started)."""
    from bokeh.application import Application
    from bokeh.application.handlers.function import FunctionHandler
    from bokeh.server.server import Server
    from tornado.web import HTTPError, RequestHandler

    from wsi_explain.core.errors import WsiExplainError
    from wsi_explain.io.tile_images import TileImages

    run_path = Path(run_path).resolve()
    if not (run_path / "cohort" / "tiles.parquet").exists():
        raise WsiExplainError(f"{run_path}: not clustered; run `wsi-explain cluster` first")
    images = TileImages(run_path)
    pyramid, overlays = deep_zoom_sources(run_path, images.slide_ids)
    pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="wsi-explain-dz")
    overviews = {sid: run_path / "slides" / sid for sid in images.slide_ids}

    class OverviewHandler(RequestHandler):
        def get(self, sid: str) -> None:
            if sid not in overviews:
                raise HTTPError(404, reason="not found")
            sdir = overviews[sid]
            p = sdir / "overview.png" if (sdir / "overview.png").exists() else sdir / "thumbnail.png"
            self.set_header("Content-Type", "image/png")
            self.write(p.read_bytes())

    app = Application(FunctionHandler(lambda doc: explorer_document(doc, run_path, images, pyramid=pyramid)))
    origins = allow_origin or [f"{address}:{port}", f"localhost:{port}", f"127.0.0.1:{port}"]
    return Server(
        {"/explorer": app},
        port=port,
        address=address,
        allow_websocket_origin=origins,
        extra_patterns=[
            (r"/tiles/([^/]+)/(\d+)\.png", _tile_handler(), {"images": images}),
            (r"/overview/([^/]+)\.png", OverviewHandler),
            (
                DEEP_ZOOM_ROUTE,
                deep_zoom_handler(),
                {"pyramid": pyramid, "overlays": overlays, "pool": pool},
            ),
        ],
    )
