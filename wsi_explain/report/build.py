"""The cohort, cluster and slide pages of a report: what each page shows, gathered from the run's
tables into plain values and rendered by :mod:`wsi_explain.report.pages` (templates, autoescaped).

Tile images are written for representative tiles only (``report/tiles``), so a report's size grows
with the number of clusters and slides, not of tiles.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

import viz
from wsi_explain.core.metric_info import metric_info
from wsi_explain.core.run import RunFolder, now_iso
from wsi_explain.report.card import cluster_card
from wsi_explain.report.explorer_inputs import cluster_table, colour_options, with_errors, with_mil
from wsi_explain.report.mil_section import mil_section
from wsi_explain.report.pages import fragment, render

__all__ = ["ReportContext", "index_page", "cluster_page", "slide_overview", "failures"]

logger = logging.getLogger(__name__)


class ReportContext:
    """What every page needs: the run's tables, names, and the tile-image writer."""

    def __init__(self, run: RunFolder, out: Path, max_points: int, thumb_px: int) -> None:
        import pyarrow.parquet as pq

        from wsi_explain.io.tile_images import TileImages
        from wsi_explain.report.names import read_cluster_names

        cdir = run.path / "cohort"
        self.run, self.out, self.thumb_px = run, out, thumb_px
        self.tiles = with_mil(pd.read_parquet(cdir / "tiles.parquet"), run.path)
        meta = json.loads(pq.read_schema(cdir / "tiles.parquet").metadata[b"wsi_explain"])
        self.cam = meta.get("cam_method") or "gradcam"
        self.class_names, self.task = meta.get("class_names") or [], (meta.get("task"), meta.get("region"))
        self.clusters = pd.read_parquet(cdir / "clusters.parquet")
        self.metrics = (
            pd.read_parquet(cdir / "cluster_metrics.parquet") if (cdir / "cluster_metrics.parquet").exists() else None
        )
        self.tile_metrics = (
            pd.read_parquet(cdir / "tile_metrics.parquet") if (cdir / "tile_metrics.parquet").exists() else None
        )
        self.sanity = pd.read_parquet(cdir / "sanity.parquet") if (cdir / "sanity.parquet").exists() else None
        self.removal = (
            pd.read_parquet(cdir / "cluster_removal.parquet") if (cdir / "cluster_removal.parquet").exists() else None
        )
        self.fits = (
            json.loads((cdir / "ensemble_fit.json").read_text()) if (cdir / "ensemble_fit.json").exists() else {}
        )
        doc = read_cluster_names(run.path)
        self.names = {int(k): v for k, v in doc["names"].items()}
        self.comments = {int(k): v for k, v in doc["comments"].items()}
        self.verdicts = {int(k): v for k, v in doc["verdicts"].items()}
        self.verdict_effect: str | None = None  # the verdicts' effect in words (set by the report stage)
        self.images = TileImages(run.path, cache=True)
        self.written: set[tuple[str, int, str]] = set()
        self.slide_info: dict[str, dict] = {}
        self.max_points = max_points

    def cname(self, c: int) -> str:
        """The cluster's display name: the pathologist's name, else "cluster c" ("noise" for -1)."""
        return self.names.get(int(c), "noise" if c < 0 else f"cluster {c}")

    def tile_img(self, sid: str, tid: int, method: str, *, prefix: str = "") -> str:
        """Write ``tiles/<slide>_<tile>_<method>.jpg`` once; return its URL from a page at ``prefix``."""
        key = (sid, int(tid), method)
        name = f"{sid}_{int(tid)}_{method}.jpg"
        if key not in self.written:
            size = 0 if method == "all" else self.thumb_px
            (self.out / "tiles").mkdir(parents=True, exist_ok=True)
            try:
                (self.out / "tiles" / name).write_bytes(
                    self.images.png(sid, int(tid), method=method, size=size, fmt="jpeg")
                )
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


def slide_overview(ctx: ReportContext, sid: str) -> dict:
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
        im = Image.open(sdir / "overview.png" if (sdir / "overview.png").exists() else sdir / "thumbnail.png").convert(
            "RGB"
        )
        im.thumbnail((640, 640))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
        url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
        ctx.slide_info[sid] = {"url": url, "width": int(W), "height": int(H), "meta": meta}
    return ctx.slide_info[sid]


def _explorer(ctx: ReportContext, tiles: pd.DataFrame, prefix: str, *, slides: list[str]):
    reps = set()
    for _, r in ctx.clusters.iterrows():
        reps.update(_refs(r.get("representatives", "{}"), ("medoid", "most_member", "borderline")))
    has = np.array([(s, int(t)) in reps for s, t in zip(tiles["slide_id"], tiles["tile_id"])])
    for s, t in zip(tiles.loc[has, "slide_id"], tiles.loc[has, "tile_id"]):
        ctx.tile_img(s, int(t), ctx.cam)
        ctx.tile_img(s, int(t), "all")
    tiles = with_errors(tiles.assign(has_thumb=has))
    info = {s: slide_overview(ctx, s) for s in slides}
    cl, table_cols = cluster_table(
        ctx.clusters,
        ctx.metrics,
        [(ctx.cam, m, f"{ctx.cam} {m}") for m in ("deletion_auc_blur", "road_combined", "pointing_game")],
    )
    colour_by = colour_options(
        tiles, metric_columns=[f"{ctx.cam}:{m}" for m in ("deletion_auc_blur", "deletion_auc_constant", "gini")]
    )
    parts = viz.explorer_layout(
        tiles,
        cl,
        slides={s: {k: v for k, v in i.items() if k != "meta"} for s, i in info.items()},
        colour_by=colour_by,
        thumb_template=prefix + "tiles/{slide}_{tile}_{method}.jpg",
        full_template=prefix + "tiles/{slide}_{tile}_all.jpg",
        methods=[ctx.cam],
        names=ctx.names,
        sort_by={"membership": "membership", "confidence": "confidence", "probability": "prob_pos"},
        has_thumb="has_thumb",
        table_columns=table_cols,
    )
    return parts


def _cohort_tiles(ctx: ReportContext) -> pd.DataFrame:
    tiles = ctx.tiles
    if ctx.tile_metrics is not None:
        extra = [c for c in ctx.tile_metrics.columns if c.startswith(f"{ctx.cam}:")][:6]
        tiles = tiles.merge(ctx.tile_metrics[["slide_id", "tile_id"] + extra], on=["slide_id", "tile_id"], how="left")
    if len(tiles) > ctx.max_points:  # keep every cluster, subsample the rest of the points
        tiles = tiles.groupby("cluster", group_keys=False).apply(
            lambda g: g.sample(max(1, int(len(g) * ctx.max_points / len(ctx.tiles))), random_state=0)
        )
    return tiles.reset_index(drop=True)


def failures(run: RunFolder) -> list[dict]:
    out = []
    for stage, rec in run.manifest["stages"].items():
        for sid, r in rec.get("slides", {}).items():
            if r.get("status") == "failed":
                out.append({"stage": stage, "slide": sid, "error": r.get("error") or ""})
    return out


def _flag_list(row) -> list[str]:
    raw = row.get("flag_reasons")
    return [] if raw is None else [str(r) for r in raw]


def _sanity(ctx: ReportContext) -> list[dict] | None:
    """Per method: passed, Spearman after full randomisation (None when the run has no sanity check)."""
    if ctx.sanity is None or not len(ctx.sanity):
        return None
    verdict = ctx.run.slide_record("score", "cohort") or {}
    return [
        {"method": m, "passed": bool(v["passed"]), "spearman": float(v["spearman"])}
        for m, v in (verdict.get("sanity") or {}).items()
    ]


def _spread(ctx: ReportContext, plots: dict) -> list[str] | None:
    """Adds one ensemble-spread plot per method to ``plots``; returns their keys (None: no ensemble)."""
    if not (ctx.fits and ctx.tile_metrics is not None and "ensemble:acc_mean" in ctx.tile_metrics.columns):
        return None
    keys = []
    for m, fit in ctx.fits.items():
        col = f"{m}:attn_std"
        if col not in ctx.tile_metrics.columns:
            continue
        pts = (
            ctx.tile_metrics[ctx.tile_metrics.cluster >= 0]
            .groupby("cluster")
            .agg(
                attn_std=(col, "mean"),
                acc_mean=("ensemble:acc_mean", "mean"),
                acc_std=("ensemble:acc_std", "mean"),
                size=(col, "size"),
            )
            .reset_index()
            .dropna()
        )
        if len(pts):
            plots[f"spread_{m}"] = viz.spread_plot(pts, fit["clusters"], method=m, title=m)
            keys.append(f"spread_{m}")
    return keys


def _removal(ctx: ReportContext, plots: dict):
    """The cluster-removal table (and plot, added to ``plots``), or None when the run has none."""
    if ctx.metrics is None or not (ctx.metrics.method == "model").any():
        return None
    rem = ctx.metrics[ctx.metrics.method == "model"].pivot_table(index="cluster", columns="metric", values="value")
    rem = rem.reset_index()
    rem = rem.rename(columns=lambda c: c.replace("removal_", "")) if len(rem) else rem
    if not {"mean_abs_d_mean", "mean_abs_d_topk"} <= set(rem.columns):
        return None
    plots["removal"] = viz.removal_plot(rem, ctx.names)
    return fragment(viz.table_html(rem.assign(cluster=[ctx.cname(c) for c in rem["cluster"]])))


def index_page(ctx: ReportContext, failed: list[dict]) -> Path:
    """``index.html``: the linked explorer, the cluster table, cohort metrics, sanity, ensemble
    spread, cluster removal, concepts, the slides and the failures."""
    tiles = _cohort_tiles(ctx)
    slides = sorted(ctx.tiles["slide_id"].unique())
    plots = {"explorer": _explorer(ctx, tiles, "", slides=slides).layout}
    clusters = [
        {
            "id": int(r["cluster"]),
            "name": ctx.cname(int(r["cluster"])),
            "size": int(r["size"]),
            "n_slides": int(r["n_slides"]),
            "positive_rate": float(r["positive_rate"]),
            "ink": float(r.get("mean_ink", float("nan"))),
            "cam_ink": float(r.get("mean_cam_on_ink", float("nan"))),
            "flags": _flag_list(r),
            "comment": ctx.comments.get(int(r["cluster"]), ""),
            "verdict": ctx.verdicts.get(int(r["cluster"]), ""),
        }
        for _, r in ctx.clusters.iterrows()
    ]
    sanity = _sanity(ctx)
    if sanity is not None:
        plots["sanity"] = viz.sanity_plot(ctx.sanity)
    return render(
        ctx.out / "index.html",
        "index.html",
        title="wsi-explain cohort report",
        plots=plots,
        css=viz.GALLERY_CSS,
        n_tiles=len(ctx.tiles),
        n_shown=len(tiles),
        n_clusters=int((ctx.clusters.cluster >= 0).sum()),
        cam=ctx.cam,
        task=ctx.task,
        generated=now_iso(),
        clusters=clusters,
        metrics_table=fragment(viz.metric_table_html(ctx.metrics, cluster=-2, info=metric_info))
        if ctx.metrics is not None
        else None,
        **_scored(ctx, -2),
        confounders=_confounder_lines(ctx),
        selftest=_selftest(ctx),
        sanity=sanity,
        spread_keys=_spread(ctx, plots),
        removal_table=_removal(ctx, plots),
        verdict_effect=ctx.verdict_effect,
        mil=mil_section(ctx.run.path, ctx.cname),
        concepts=_concepts(ctx),
        slides=slides,
        failures_table=fragment(viz.table_html(pd.DataFrame(failed))) if failed else None,
    )


def _concept_images(ctx: ReportContext, k: int, rows: list, maps) -> list[dict]:
    """Overlays of concept ``k``'s map on its top tiles, written to ``tiles/``."""
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
            imgs.append({"file": name, "title": f"{t.slide_id} tile {int(t.tile_id)}"})
        except Exception as exc:  # an unreadable tile: leave it out of the strip
            logger.warning("report: concept %d tile %s/%s unavailable (%s)", k, t.slide_id, t.tile_id, exc)
    return imgs


def _concepts(ctx: ReportContext) -> dict | None:
    """Concept prototypes (NMF): association with the prediction, correlation with the CAM, the
    mean weight per cluster, and each concept's spatial map over its top tiles (None without)."""
    import zarr

    path = ctx.run.path / "cohort" / "concepts.zarr"
    cols = [c for c in ctx.tiles.columns if c.startswith("concept_") and c[8:].isdigit()]
    if not path.exists() or not cols:
        return None
    z = zarr.open_group(str(path), mode="r")
    maps, attrs = z["maps"], dict(z.attrs)
    mean = ctx.tiles.groupby("cluster")[cols].mean().reset_index()
    mean["cluster"] = [ctx.cname(c) for c in mean["cluster"]]
    aucs = attrs.get("auc") or [None] * len(cols)
    rs = attrs.get("cam_correlation") or [None] * len(cols)
    items = [
        {
            "name": col,
            "auc": aucs[k],
            "r": rs[k],
            "images": _concept_images(ctx, k, (attrs.get("top_tiles") or {}).get(str(k), [])[:6], maps),
        }
        for k, col in enumerate(cols)
    ]
    return {
        "n_positions": attrs.get("n_positions"),
        "error": float(attrs.get("reconstruction_error") or float("nan")),
        "mean_table": fragment(viz.table_html(mean)),
        "rows": items,
    }


def _confounder_lines(ctx: ReportContext) -> list[str] | None:
    """The confounder scan and the site tests in words with their notes, or None without a scan."""
    from wsi_explain.report.sentences import shortcut_lines

    return shortcut_lines(ctx.run.path / "cohort")


def _selftest(ctx: ReportContext) -> dict | None:
    """The self-test's table and sentences (None without ``cohort/selftest.json``)."""
    from wsi_explain.report.selftest_text import SELFTEST_HEADER, read_selftest, selftest_rows, selftest_sentences

    figures = read_selftest(ctx.run.path / "cohort")
    if figures is None:
        return None
    return {"header": SELFTEST_HEADER, "rows": selftest_rows(figures), "lines": selftest_sentences(figures)}


def _scored(ctx: ReportContext, cluster: int) -> dict:
    """A cluster's (the cohort's: -2) ``gains`` against the reference maps and ``sample_notes``."""
    from wsi_explain.report.sentences import gain_sentences

    notes = (ctx.run.slide_record("score", "cohort") or {}).get("sample_notes") or []
    mine = [n for n in notes if cluster == -2 or n.startswith(f"cluster {cluster}:")]
    gains = [] if ctx.metrics is None else gain_sentences(ctx.metrics[ctx.metrics.cluster == cluster])
    return {"gains": gains, "sample_notes": mine}


def cluster_page(ctx: ReportContext, row: dict) -> Path:
    """``clusters/cluster_<c>.html``: size, flags, comment, composition by slide, metrics, and the
    representative, borderline and outlier tiles with every stored map."""
    c = int(row["cluster"])
    g = ctx.tiles[ctx.tiles.cluster == c]
    comp = g.groupby("slide_id").size().rename("tiles").reset_index()
    for col in ("label", "site"):
        if col in g.columns:
            comp = comp.merge(g.groupby("slide_id")[col].first().reset_index(), on="slide_id")
    sections = []
    for title, kinds in (
        ("Representative tiles", ("medoid", "most_member")),
        ("Borderline tiles", ("borderline",)),
        ("Outliers", ("outliers",)),
    ):
        refs = _refs(row.get("representatives", "{}"), kinds)
        if refs:
            tiles = [{"slide": s, "tile": t, "src": ctx.tile_img(s, t, "all", prefix="../")} for s, t in refs]
            sections.append({"title": title, "tiles": tiles})
    info = {k: row[k] for k in ("size", "n_slides", "positive_rate", "mean_confidence")}
    mine = ctx.metrics[ctx.metrics.cluster == c] if ctx.metrics is not None else None
    card = cluster_card(
        row,
        cohort_positive=float((ctx.tiles["pred"] == 1).mean()),
        cam=ctx.cam,
        metrics=mine,
        sanity=_sanity(ctx),
        verdict=ctx.verdicts.get(c),
    )
    return render(
        ctx.out / "clusters" / f"cluster_{c}.html",
        "cluster.html",
        title=ctx.cname(c),
        static="../static",
        home="../",
        c={**info, "flags": _flag_list(row)},
        comment=ctx.comments.get(c),
        verdict=ctx.verdicts.get(c),
        composition_table=fragment(viz.table_html(comp)),
        card=card,
        metrics_table=fragment(viz.metric_table_html(ctx.metrics, cluster=c, info=metric_info))
        if mine is not None
        else None,
        **_scored(ctx, c),
        sections=sections,
    )
