"""Cohort and per-slide HTML reports of a run (``wsi-explain report``).

``report/index.html`` (the linked explorer, cluster table, metrics with intervals, ensemble and
sanity plots, cluster removal, concepts, flags and failures in words), ``report/clusters/<c>.html``
(representative and borderline tiles with their maps, composition, metrics) and
``report/slides/<id>.html`` (thumbnail, prediction heatmap, cluster map, the slide's tiles per
cluster with CAM overlays, slide scores). BokehJS is copied to ``report/static``; tile images are
written for the representative tiles only (``report/tiles``), so the size stays bounded.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

import viz
from viz import escape

from wsi_explain.report.explorer_inputs import cluster_table, colour_options
from wsi_explain.core.run import STAGES, now_iso, RunFolder

__all__ = ["run_report_stage", "ReportOutcome", "STAGE"]

logger = logging.getLogger(__name__)

STAGE = STAGES[4]  # "report"
COHORT = "cohort"


@dataclass
class ReportOutcome:
    status: str
    index: Path
    n_pages: int
    n_images: int
    seconds: float


class _Ctx:
    """What every page needs: the run's tables, names, and the tile-image writer."""

    def __init__(self, run: RunFolder, out: Path, max_points: int, thumb_px: int) -> None:
        import pyarrow.parquet as pq

        from wsi_explain.report.names import read_cluster_names
        from wsi_explain.io.tile_images import TileImages

        cdir = run.path / "cohort"
        self.run, self.out, self.thumb_px = run, out, thumb_px
        self.tiles = pd.read_parquet(cdir / "tiles.parquet")
        meta = json.loads(pq.read_schema(cdir / "tiles.parquet").metadata[b"wsi_explain"])
        self.cam = meta.get("cam_method") or "gradcam"
        self.class_names = meta.get("class_names") or []
        self.clusters = pd.read_parquet(cdir / "clusters.parquet")
        self.metrics = pd.read_parquet(cdir / "cluster_metrics.parquet") if (cdir / "cluster_metrics.parquet").exists() else None
        self.tile_metrics = pd.read_parquet(cdir / "tile_metrics.parquet") if (cdir / "tile_metrics.parquet").exists() else None
        self.sanity = pd.read_parquet(cdir / "sanity.parquet") if (cdir / "sanity.parquet").exists() else None
        self.removal = pd.read_parquet(cdir / "cluster_removal.parquet") if (cdir / "cluster_removal.parquet").exists() else None
        self.fits = json.loads((cdir / "ensemble_fit.json").read_text()) if (cdir / "ensemble_fit.json").exists() else {}
        doc = read_cluster_names(run.path)
        self.names = {int(k): v for k, v in doc["names"].items()}
        self.comments = {int(k): v for k, v in doc["comments"].items()}
        self.images = TileImages(run.path, cache=True)
        self.written: set[tuple[str, int, str]] = set()
        self.slide_info: dict[str, dict] = {}
        self.max_points = max_points

    def cname(self, c: int) -> str:
        return self.names.get(int(c), "noise" if c < 0 else f"cluster {c}")

    def tile_img(self, sid: str, tid: int, method: str, *, prefix: str = "") -> str:
        """Write ``tiles/<slide>_<tile>_<method>.jpg`` once; return its URL from a page at ``prefix``."""
        key = (sid, int(tid), method)
        name = f"{sid}_{int(tid)}_{method}.jpg"
        if key not in self.written:
            size = 0 if method == "all" else self.thumb_px
            (self.out / "tiles").mkdir(parents=True, exist_ok=True)
            try:
                (self.out / "tiles" / name).write_bytes(self.images.png(sid, int(tid), method=method, size=size, fmt="jpeg"))
            except Exception as exc:  # an unreadable tile: a placeholder note instead of a failed report
                logger.warning("report: no image for %s tile %s (%s)", sid, tid, exc)
                return ""
            self.written.add(key)
        return f"{prefix}tiles/{name}"


#: representative tiles per kind (medoid, most_member, borderline, outliers) given images in the
#: report: the report's size grows with the number of clusters and slides, not of tiles
PER_KIND = 4


def _refs(rep_json: str, kinds: tuple[str, ...], per_kind: int = PER_KIND) -> list[tuple[str, int]]:
    reps = json.loads(rep_json) if isinstance(rep_json, str) else {}
    out = []
    for k in kinds:
        for ref in reps.get(k, [])[:per_kind]:
            sid, tid = ref.rsplit(":", 1)
            if (sid, int(tid)) not in out:
                out.append((sid, int(tid)))
    return out


def _flags_html(row) -> str:
    raw = row.get("flag_reasons")
    reasons = [] if raw is None else list(raw)
    if not reasons:
        return "<span class='muted'>no flag</span>"
    return "<br>".join(f"<span class='flag'>&#9873; {escape(r)}</span>" for r in reasons)


def _slide_info(ctx: _Ctx, sid: str) -> dict:
    """Level-0 size, tile-table metadata and the overview as a data URI (pages opened from disk
    may not load images into a canvas from file:// URLs), at most 640 px on its longer side;
    computed once per slide (the index and the slide page both use it)."""
    import base64
    import io

    from PIL import Image

    from wsi_explain.io.tile_table import read_tile_table

    if sid not in ctx.slide_info:
        sdir = ctx.run.slide_dir(sid)
        _, meta = read_tile_table(sdir / "tiles.parquet")
        W, H = meta["level0_dimensions"]
        im = Image.open(sdir / "overview.png" if (sdir / "overview.png").exists() else sdir / "thumbnail.png").convert("RGB")
        im.thumbnail((640, 640))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
        url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
        ctx.slide_info[sid] = {"url": url, "width": int(W), "height": int(H), "meta": meta}
    return ctx.slide_info[sid]


def _explorer(ctx: _Ctx, tiles: pd.DataFrame, prefix: str, *, slides: list[str]):
    reps = set()
    for _, r in ctx.clusters.iterrows():
        reps.update(_refs(r.get("representatives", "{}"), ("medoid", "most_member", "borderline")))
    has = np.array([(s, int(t)) in reps for s, t in zip(tiles["slide_id"], tiles["tile_id"])])
    for s, t in zip(tiles.loc[has, "slide_id"], tiles.loc[has, "tile_id"]):
        ctx.tile_img(s, int(t), ctx.cam)
        ctx.tile_img(s, int(t), "all")
    tiles = tiles.assign(has_thumb=has)
    info = {s: _slide_info(ctx, s) for s in slides}
    cl, table_cols = cluster_table(ctx.clusters, ctx.metrics, [(ctx.cam, m, f"{ctx.cam} {m}")
                                                            for m in ("deletion_auc_blur", "road_combined", "pointing_game")])
    colour_by = colour_options(tiles, metric_columns=[f"{ctx.cam}:{m}" for m in ("deletion_auc_blur", "deletion_auc_constant", "gini")])
    parts = viz.explorer_layout(
        tiles, cl, slides={s: {k: v for k, v in i.items() if k != "meta"} for s, i in info.items()},
        colour_by=colour_by, thumb_template=prefix + "tiles/{slide}_{tile}_{method}.jpg",
        full_template=prefix + "tiles/{slide}_{tile}_all.jpg", methods=[ctx.cam], names=ctx.names,
        sort_by={"membership": "membership", "confidence": "confidence", "probability": "prob_pos"},
        has_thumb="has_thumb", table_columns=table_cols)
    return parts


def _cohort_tiles(ctx: _Ctx) -> pd.DataFrame:
    tiles = ctx.tiles
    if ctx.tile_metrics is not None:
        extra = [c for c in ctx.tile_metrics.columns if c.startswith(f"{ctx.cam}:")][:6]
        tiles = tiles.merge(ctx.tile_metrics[["slide_id", "tile_id"] + extra], on=["slide_id", "tile_id"], how="left")
    if len(tiles) > ctx.max_points:  # keep every cluster, subsample the rest of the points
        tiles = tiles.groupby("cluster", group_keys=False).apply(
            lambda g: g.sample(max(1, int(len(g) * ctx.max_points / len(ctx.tiles))), random_state=0))
    return tiles.reset_index(drop=True)


def _nav(prefix: str) -> str:
    return f"<a href='{prefix}index.html'>Cohort report</a>"


def _index(ctx: _Ctx, failures: list[dict]) -> tuple[int, Path]:
    tiles = _cohort_tiles(ctx)
    slides = sorted(ctx.tiles["slide_id"].unique())
    parts = _explorer(ctx, tiles, "", slides=slides)
    plots = {"explorer": parts.layout}
    n = len(ctx.tiles)
    body = [f"<p>{n} tiles from {len(slides)} slides in {int((ctx.clusters.cluster >= 0).sum())} clusters. "
            f"Attribution shown: <b>{escape(ctx.cam)}</b>. Generated {escape(now_iso())}."
            + (f" The scatter shows a sample of {len(tiles)} tiles." if len(tiles) < n else "") + "</p>",
            "<h2>Explorer</h2><p class='muted'>Box-select or lasso in the UMAP or on the slide; click a cluster row to "
            "select its tiles. The gallery shows the selected tiles (images exist for representative tiles only; "
            "<code>wsi-explain serve</code> shows every tile).</p><!--plot:explorer-->"]
    body.append("<h2>Clusters</h2>")
    rows = []
    for _, r in ctx.clusters.iterrows():
        c = int(r["cluster"])
        ink, cam_ink = r.get("mean_ink", float("nan")), r.get("mean_cam_on_ink", float("nan"))
        rows.append(f"<tr><td><a href='clusters/cluster_{c}.html'>{escape(ctx.cname(c))}</a></td><td class='num'>{r['size']}</td>"
                    f"<td class='num'>{r['n_slides']}</td><td class='num'>{r['positive_rate']:.2f}</td>"
                    f"<td class='num'>{ink:.2f}</td><td class='num'>{cam_ink:.2f}</td><td>{_flags_html(r)}</td>"
                    f"<td>{escape(ctx.comments.get(c, ''))}</td></tr>")
    body.append("<table class='wx-table'><thead><tr><th>cluster</th><th>tiles</th><th>slides</th><th>predicted positive</th>"
                f"<th>pen-ink area</th><th>{escape(ctx.cam)} mass on ink</th><th>flags</th><th>comment</th></tr></thead><tbody>"
                + "".join(rows) + "</tbody></table>")
    if ctx.metrics is not None:
        body.append("<h2>Metrics (whole cohort)</h2><p class='muted'>Mean [95% bootstrap CI] (tiles). Per-cluster tables on the "
                    "cluster pages; all rows in <code>cohort/cluster_metrics.parquet</code>.</p>")
        body.append(viz.metric_table_html(ctx.metrics, cluster=-2))
    if ctx.sanity is not None and len(ctx.sanity):
        verdict = ctx.run.slide_record("score", COHORT) or {}
        lines = [f"{escape(m)}: {'passes' if v['passed'] else '<span class=flag>FAILS</span>'} (Spearman {v['spearman']:.2f})"
                 for m, v in (verdict.get("sanity") or {}).items()]
        body.append("<h2>Sanity check: model randomisation</h2><p>" + "<br>".join(lines) + "</p><!--plot:sanity-->")
        plots["sanity"] = viz.sanity_plot(ctx.sanity)
    if ctx.fits and ctx.tile_metrics is not None and "ensemble:acc_mean" in ctx.tile_metrics.columns:
        body.append("<h2>Ensemble spread</h2><p class='muted'>One point per cluster; fits as in Koriakina et al. "
                    "(quadratic against mean accuracy, linear against its standard deviation).</p>")
        for m, fit in ctx.fits.items():
            col = f"{m}:attn_std"
            if col not in ctx.tile_metrics.columns:
                continue
            pts = ctx.tile_metrics[ctx.tile_metrics.cluster >= 0].groupby("cluster").agg(
                attn_std=(col, "mean"), acc_mean=("ensemble:acc_mean", "mean"), acc_std=("ensemble:acc_std", "mean"),
                size=(col, "size")).reset_index().dropna()
            if len(pts):
                key = f"spread_{m}"
                plots[key] = viz.spread_plot(pts, fit["clusters"], method=m, title=m)
                body.append(f"<!--plot:{key}-->")
    if ctx.metrics is not None and (ctx.metrics.method == "model").any():
        rem = ctx.metrics[ctx.metrics.method == "model"].pivot_table(index="cluster", columns="metric", values="value").reset_index()
        rem = rem.rename(columns=lambda c: c.replace("removal_", "")) if len(rem) else rem
        if {"mean_abs_d_mean", "mean_abs_d_topk"} <= set(rem.columns):
            plots["removal"] = viz.removal_plot(rem, ctx.names)
            body.append("<h2>Cluster removal</h2><p>How much slide-level scores move when a cluster's tiles are dropped "
                        "(clusters the slide decisions rest on rank first).</p><!--plot:removal-->")
            body.append(viz.table_html(rem.assign(cluster=[ctx.cname(c) for c in rem["cluster"]])))
    body.extend(_concepts_html(ctx))
    body.append("<h2>Slides</h2><ul>" + "".join(f"<li><a href='slides/{escape(s)}.html'>{escape(s)}</a></li>" for s in slides) + "</ul>")
    if failures:
        body.append("<h2>Failures</h2>" + viz.table_html(pd.DataFrame(failures)))
    path = viz.render_page(ctx.out / "index.html", title="wsi-explain cohort report", body="".join(body), plots=plots,
                           static="static", css=viz.GALLERY_CSS)
    return 1, path


def _concepts_html(ctx: _Ctx) -> list[str]:
    """Concept prototypes (NMF): association with the prediction, correlation with the CAM, the
    mean weight per cluster, and each concept's spatial map over its top tiles."""
    import zarr

    path = ctx.run.path / "cohort" / "concepts.zarr"
    concept_cols = [c for c in ctx.tiles.columns if c.startswith("concept_") and c[8:].isdigit()]
    if not path.exists() or not concept_cols:
        return []
    z = zarr.open_group(str(path), mode="r")
    maps, attrs = z["maps"], dict(z.attrs)
    out = ["<h2>Concepts (NMF prototypes of the target layer's activations)</h2>",
           f"<p class='muted'>Fitted on {attrs.get('n_positions')} spatial positions sampled over the cohort; "
           f"reconstruction error {float(attrs.get('reconstruction_error') or float('nan')):.3f}. AUC: how well the concept's "
           "weight alone separates predicted positive from negative tiles; CAM r: correlation of its map with the CAM.</p>"]
    mean = ctx.tiles.groupby("cluster")[concept_cols].mean().reset_index()
    mean["cluster"] = [ctx.cname(c) for c in mean["cluster"]]
    out.append(viz.table_html(mean))
    for k, col in enumerate(concept_cols):
        auc = (attrs.get("auc") or [None] * len(concept_cols))[k]
        r = (attrs.get("cam_correlation") or [None] * len(concept_cols))[k]
        rows = (attrs.get("top_tiles") or {}).get(str(k), [])[:6]
        imgs = []
        for row in rows:
            t = ctx.tiles.iloc[int(row)]
            name = f"{t.slide_id}_{int(t.tile_id)}_concept{k}.jpg"
            try:
                tile = ctx.images.tile(t.slide_id, int(t.tile_id))
                img = viz.cam_overlay(tile, np.asarray(maps[int(row), k], np.float32))
                (ctx.out / "tiles").mkdir(parents=True, exist_ok=True)
                (ctx.out / "tiles" / name).write_bytes(viz.to_jpeg(img))
                ctx.written.add((t.slide_id, int(t.tile_id), f"concept{k}"))
                imgs.append(f"<img src='tiles/{escape(name)}' width='112' title='{escape(t.slide_id)} tile {int(t.tile_id)}'>")
            except Exception as exc:  # an unreadable tile: leave it out of the strip
                logger.warning("report: concept %d tile %s/%s unavailable (%s)", k, t.slide_id, t.tile_id, exc)
        fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
        out.append(f"<p><b>{escape(col)}</b>: AUC {fmt(auc)}, CAM r {fmt(r)}<br><span class='tiles'>{''.join(imgs)}</span></p>")
    return out


def _cluster_page(ctx: _Ctx, row) -> None:
    c = int(row["cluster"])
    body = [f"<p>{row['size']} tiles from {row['n_slides']} slides; predicted positive rate {row['positive_rate']:.2f}, "
            f"mean confidence {row['mean_confidence']:.2f}.</p><p>{_flags_html(row)}</p>"]
    if c in ctx.comments:
        body.append(f"<p><b>Comment:</b> {escape(ctx.comments[c])}</p>")
    g = ctx.tiles[ctx.tiles.cluster == c]
    comp = g.groupby("slide_id").size().rename("tiles").reset_index()
    for col in ("label", "site"):
        if col in g.columns:
            comp = comp.merge(g.groupby("slide_id")[col].first().reset_index(), on="slide_id")
    body.append("<h2>Composition</h2>" + viz.table_html(comp))
    if ctx.metrics is not None:
        body.append("<h2>Metrics</h2>" + viz.metric_table_html(ctx.metrics, cluster=c))
    for title, kinds in (("Representative tiles", ("medoid", "most_member")), ("Borderline tiles", ("borderline",)),
                         ("Outliers", ("outliers",))):
        refs = _refs(row.get("representatives", "{}"), kinds)
        if refs:
            body.append(f"<h2>{title}</h2><p class='muted'>Tile, then each stored map.</p><div class='strip'>")
            for sid, tid in refs:
                src = ctx.tile_img(sid, tid, "all", prefix="../")
                body.append(f"<p>{escape(sid)} tile {tid}</p><img src='{src}' alt='{escape(sid)} {tid}'>" if src else
                            f"<p>{escape(sid)} tile {tid}: image unavailable</p>")
            body.append("</div>")
    viz.render_page(ctx.out / "clusters" / f"cluster_{c}.html", title=ctx.cname(c), body="".join(body), static="../static",
                    nav=_nav("../"))


def _slide_page(ctx: _Ctx, sid: str) -> None:
    from bokeh.layouts import row as brow
    from bokeh.models import ColumnDataSource, HoverTool, Range1d
    from bokeh.plotting import figure

    info = _slide_info(ctx, sid)
    meta = info["meta"]
    g = ctx.tiles[ctx.tiles.slide_id == sid].reset_index(drop=True)
    W, H = info["width"], info["height"]
    figs = []
    for title, col in (("Prediction heatmap (probability of the positive class)", "prob_pos"), ("Cluster map", "cluster")):
        colours = viz.continuous_colours(g[col].to_numpy(), lo=0.0, hi=1.0)[0] if col == "prob_pos" else viz.colour_column(g[col].to_numpy())
        src = ColumnDataSource({"xc": g["x"] + g["size0"] / 2, "yc": g["y"] + g["size0"] / 2, "s": g["size0"], "c": colours,
                                "cluster": [ctx.cname(c) for c in g["cluster"]], "p": g["prob_pos"], "tile": g["tile_id"]})
        f = figure(title=title, width=480, height=int(480 * H / W) if W else 480, x_range=Range1d(0, W), y_range=Range1d(H, 0),
                   tools="pan,wheel_zoom,reset,save")
        f.image_url(url=[info["url"]], x=0, y=0, w=W, h=H, anchor="top_left")
        f.rect("xc", "yc", "s", "s", source=src, fill_color="c", line_color="c", fill_alpha=0.55)
        f.add_tools(HoverTool(tooltips=[("tile", "@tile"), ("cluster", "@cluster"), ("p", "@p{0.00}")]))
        f.xaxis.visible = f.yaxis.visible = False
        figs.append(f)
    heat = _cam_heatmap(ctx, sid, g, meta)
    if heat is not None:
        f = figure(title=f"{ctx.cam} heatmap (raw values, one scale for the slide)", width=480,
                   height=int(480 * H / W) if W else 480, x_range=Range1d(0, W), y_range=Range1d(H, 0), tools="pan,wheel_zoom,reset,save")
        f.image_url(url=[heat], x=0, y=0, w=W, h=H, anchor="top_left")
        f.xaxis.visible = f.yaxis.visible = False
        figs.append(f)
    src_name = Path(meta.get("slide_path", sid)).name
    body = [f"<p>File: {escape(src_name)}; {len(g)} tiles; level-0 {W} x {H} px at {escape(meta.get('level0_mpp'))} µm/px.</p>"]
    slide_meta = meta.get("meta") or {}
    if slide_meta:
        body.append(viz.table_html(pd.DataFrame([slide_meta]).astype(str)))
    scores = {"mean probability": float(g["prob_pos"].mean()), "top-8 mean": float(np.sort(g["prob_pos"].to_numpy())[-8:].mean())}
    body.append("<h2>Slide scores</h2>" + viz.table_html(pd.DataFrame([scores])))
    body.append("<!--plot:maps-->")
    if ctx.removal is not None and len(ctx.removal):
        r = ctx.removal[ctx.removal.slide_id == sid]
        if len(r):
            r = r.assign(cluster=[ctx.cname(c) for c in r["cluster"]]).drop(columns=["slide_id"])
            body.append("<h2>Effect of removing each cluster on this slide's score</h2>" + viz.table_html(r))
    body.append(f"<h2>Tiles per cluster</h2><p class='muted'>Most confident tiles with their {escape(ctx.cam)} overlay "
                "(representative tiles link to every map).</p>")
    for c, gc in g.groupby("cluster"):
        top = gc.nlargest(3, "confidence")
        imgs = ""
        for t in top["tile_id"]:  # thumbnails only; a link to every map where a strip exists (representatives)
            thumb = f"<img src='{ctx.tile_img(sid, int(t), ctx.cam, prefix='../')}' title='tile {int(t)}'>"
            strip = f"../tiles/{sid}_{int(t)}_all.jpg" if (sid, int(t), "all") in ctx.written else ""
            imgs += f"<a href='{strip}'>{thumb}</a>" if strip else thumb
        body.append(f"<p><a href='../clusters/cluster_{int(c)}.html'>{escape(ctx.cname(c))}</a>: {len(gc)} tiles "
                    f"<span class='tiles'>{imgs}</span></p>")
    viz.render_page(ctx.out / "slides" / f"{sid}.html", title=f"Slide {sid}", body="".join(body),
                    plots={"maps": brow(*figs)}, static="../static", nav=_nav("../"))


def _cam_heatmap(ctx: _Ctx, sid: str, g: pd.DataFrame, meta: dict) -> str | None:
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


def _failures(run: RunFolder) -> list[dict]:
    out = []
    for stage, rec in run.manifest["stages"].items():
        for sid, r in rec.get("slides", {}).items():
            if r.get("status") == "failed":
                out.append({"stage": stage, "slide": sid, "error": r.get("error") or ""})
    return out


def run_report_stage(run: RunFolder, *, max_points: int = 200_000, thumb_px: int = 128,
                     on_progress: Callable[[str, int, int], None] | None = None) -> ReportOutcome:
    """Write the cohort report, one page per cluster and one per slide (always rebuilt: names and
    metrics may have changed). Needs a clustered run; metrics appear when the run is scored."""
    from wsi_explain.core.errors import WsiExplainError

    t0 = time.perf_counter()
    if not (run.path / "cohort" / "tiles.parquet").exists():
        raise WsiExplainError(f"{run.path}: not clustered; run `wsi-explain cluster` first")
    progress = on_progress or (lambda what, done, total: None)
    final = run.path / "report"
    out = run.path / ".report.tmp"
    shutil.rmtree(out, ignore_errors=True)
    viz.copy_bokeh_js(out / "static")
    ctx = _Ctx(run, out, max_points, thumb_px)
    start = now_iso()
    clusters = list(ctx.clusters.itertuples(index=False))
    slides = sorted(ctx.tiles["slide_id"].unique())
    total = 1 + len(clusters) + len(slides)
    progress("report pages", 0, total)
    _index(ctx, _failures(run))
    done = 1
    for r in ctx.clusters.to_dict("records"):
        _cluster_page(ctx, r)
        done += 1
        progress("report pages", done, total)
    for sid in slides:
        _slide_page(ctx, sid)
        done += 1
        progress("report pages", done, total)
    if final.exists():
        old = run.path / ".report.old"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        out.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        out.rename(final)
    res = ReportOutcome("done", final / "index.html", total, len(ctx.written), time.perf_counter() - t0)
    run.record(STAGE, COHORT, status="done", outputs=["report/index.html"], n_pages=total, n_images=len(ctx.written),
               start=start, end=now_iso(), seconds=round(res.seconds, 3), error=None)
    return res
