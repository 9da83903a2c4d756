"""The page of one slide in a report (``slides/<id>.html``): its maps over the overview (prediction
heatmap, cluster map, stitched CAM heatmap), scores, the effect of removing each cluster, and its
most confident tiles per cluster."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

import viz
from wsi_explain.report.build import ReportContext, slide_overview
from wsi_explain.report.pages import fragment, render

__all__ = ["slide_page"]


def _cam_heatmap(ctx: ReportContext, sid: str, g: pd.DataFrame, meta: dict) -> str | None:
    """The slide's stitched CAM heatmap over its overview, as a PNG data URI (None without CAMs)."""
    import base64

    from PIL import Image

    import tiling
    from wsi_explain.io.features import open_store, read_cams

    sdir = ctx.run.slide_dir(sid)
    store = open_store(sdir / "features.zarr")
    if f"cams/{ctx.cam}" not in store or not (sdir / "overview.png").exists():
        return None
    overview = np.asarray(Image.open(sdir / "overview.png").convert("RGB"))
    maps = read_cams(store, ctx.cam, g["tile_id"].to_numpy(np.int64))
    img = viz.stitch_heatmap(overview, float(meta["tissue_mask_scale"]), tiling.tile_boxes(g), maps)
    return "data:image/png;base64," + base64.b64encode(viz.to_png(img)).decode()


def _slide_figure(title: str, info: dict):
    """An empty Bokeh figure in level-0 pixels over the slide's overview (y down)."""
    from bokeh.models import Range1d
    from bokeh.plotting import figure

    W, H = info["width"], info["height"]
    f = figure(
        title=title,
        width=480,
        height=int(480 * H / W) if W else 480,
        x_range=Range1d(0, W),
        y_range=Range1d(H, 0),
        tools="pan,wheel_zoom,reset,save",
    )
    f.xaxis.visible = f.yaxis.visible = False
    return f


def _slide_figures(ctx: ReportContext, sid: str, g: pd.DataFrame, info: dict) -> list:
    """Prediction heatmap and cluster map over the overview, and the stitched CAM heatmap."""
    from bokeh.models import ColumnDataSource, HoverTool

    W, H = info["width"], info["height"]
    figs = []
    for title, col in (
        ("Prediction heatmap (probability of the positive class)", "prob_pos"),
        ("Cluster map", "cluster"),
    ):
        v = g[col].to_numpy()
        colours = viz.continuous_colours(v, lo=0.0, hi=1.0)[0] if col == "prob_pos" else viz.colour_column(v)
        src = ColumnDataSource(
            {
                "xc": g["x"] + g["size0"] / 2,
                "yc": g["y"] + g["size0"] / 2,
                "s": g["size0"],
                "c": colours,
                "cluster": [ctx.cname(c) for c in g["cluster"]],
                "p": g["prob_pos"],
                "tile": g["tile_id"],
            }
        )
        f = _slide_figure(title, info)
        f.image_url(url=[info["url"]], x=0, y=0, w=W, h=H, anchor="top_left")
        f.rect("xc", "yc", "s", "s", source=src, fill_color="c", line_color="c", fill_alpha=0.55)
        f.add_tools(HoverTool(tooltips=[("tile", "@tile"), ("cluster", "@cluster"), ("p", "@p{0.00}")]))
        figs.append(f)
    heat = _cam_heatmap(ctx, sid, g, info["meta"])
    if heat is not None:
        f = _slide_figure(f"{ctx.cam} heatmap (raw values, one scale for the slide)", info)
        f.image_url(url=[heat], x=0, y=0, w=W, h=H, anchor="top_left")
        figs.append(f)
    return figs


def slide_page(ctx: ReportContext, sid: str) -> Path:
    """``slides/<id>.html``: file and size, slide metadata, slide scores, the maps, the effect of
    removing each cluster, and the slide's most confident tiles per cluster."""
    from bokeh.layouts import row as brow

    info = slide_overview(ctx, sid)
    meta = info["meta"]
    g = ctx.tiles[ctx.tiles.slide_id == sid].reset_index(drop=True)
    scores = {
        "mean probability": float(g["prob_pos"].mean()),
        "top-8 mean": float(np.sort(g["prob_pos"].to_numpy())[-8:].mean()),
    }
    removal = None
    if ctx.removal is not None and len(ctx.removal):
        r = ctx.removal[ctx.removal.slide_id == sid]
        if len(r):
            r = r.assign(cluster=[ctx.cname(c) for c in r["cluster"]]).drop(columns=["slide_id"])
            removal = fragment(viz.table_html(r))
    clusters = []
    for c, gc in g.groupby("cluster"):
        tiles = []
        for t in gc.nlargest(3, "confidence")["tile_id"]:  # a link to every map where a strip exists
            thumb = ctx.tile_img(sid, int(t), ctx.cam, prefix="../")
            strip = f"../tiles/{sid}_{int(t)}_all.jpg" if (sid, int(t), "all") in ctx.written else ""
            tiles.append({"tile": int(t), "thumb": thumb, "strip": strip})
        clusters.append({"id": int(c), "name": ctx.cname(c), "n": len(gc), "tiles": tiles})
    slide_meta = meta.get("meta") or {}
    return render(
        ctx.out / "slides" / f"{sid}.html",
        "slide.html",
        title=f"Slide {sid}",
        plots={"maps": brow(*_slide_figures(ctx, sid, g, info))},
        static="../static",
        home="../",
        file=Path(meta.get("slide_path", sid)).name,
        slide_id=sid,
        run_dir=str(ctx.run.path),
        n_tiles=len(g),
        width=info["width"],
        height=info["height"],
        mpp=meta.get("level0_mpp"),
        meta_table=fragment(viz.table_html(pd.DataFrame([slide_meta]).astype(str))) if slide_meta else None,
        scores_table=fragment(viz.table_html(pd.DataFrame([scores]))),
        removal_table=removal,
        cam=ctx.cam,
        clusters=clusters,
    )
