"""The metrics stage: score every cluster of the cohort, per attribution method.

Outputs (in ``cohort/``):

- ``cluster_metrics.parquet``: one row per (cluster, method, metric): value (the mean over the
  cluster's tiles), ci_low / ci_high (95 % bootstrap; a normal approximation above 5,000 tiles),
  n_tiles. ``cluster == -2`` rows are the whole cohort; -1 is HDBSCAN's noise. The
  cluster-removal results are rows of method ``model``.
- ``tile_metrics.parquet``: one row per tile of the cohort (slide_id, tile_id, cluster, sampled)
  and one float column ``<method>:<metric>`` per value (NaN where not computed), for plots and
  colouring.
- ``sanity.parquet``: the cascading randomisation curve per cluster and method.
- ``cluster_removal.parquet``: each cluster's effect on each slide's score.
- ``ensemble_fit.json``: the fitted spread-accuracy relations, when there is an ensemble.

Cheap metrics (complexity of the stored maps, ensemble spread from stored arrays, cluster
removal) use every tile, slide by slide; expensive ones run on a sample per cluster, cluster by
cluster, each cluster's part saved so that a killed run resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from wsi_explain import metrics as M
from wsi_explain.core.atomic import atomic_write_json, atomic_write_parquet
from wsi_explain.core.config import ClusterConfig, ExtractConfig, ScoreConfig
from wsi_explain.core.errors import WsiExplainError
from wsi_explain.core.run import STAGES, RunFolder, now_iso, params_hash

__all__ = ["STAGE", "COHORT_ROW", "ScoreOutcome", "run_score_stage", "read_cluster_metrics"]

logger = logging.getLogger(__name__)

STAGE = STAGES[3]  # "score"
COHORT = "cohort"
#: the ``cluster`` value of whole-cohort rows in cluster_metrics.parquet
COHORT_ROW = -2
_NORMAL_ABOVE = 5000


@dataclass
class ScoreOutcome:
    status: str
    n_rows: int = 0
    n_sampled: int = 0
    seconds: float = 0.0
    sanity: dict = field(default_factory=dict)
    #: per cluster, what its scores rest on when the sample was not a plain one (in words)
    notes: list = field(default_factory=list)


def _cheap_metrics(run: RunFolder, tiles: pd.DataFrame, cfg: ScoreConfig, positive: int) -> pd.DataFrame:
    """Complexity of every stored map and the stored ensemble's spread, slide by slide."""
    from wsi_explain.io.features import open_store, read_maps, stored_methods
    from wsi_explain.io.tile_table import read_tile_table, tissue_cells

    groups = set(cfg.groups)
    parts = []
    for sid, df in tiles.groupby("slide_id", sort=False):
        sdir = run.slide_dir(sid)
        g = open_store(sdir / "features.zarr")
        _, meta = read_tile_table(sdir / "tiles.parquet")
        ids = df["tile_id"].to_numpy(np.int64)
        out = pd.DataFrame(index=df.index)
        scale = float(meta["tissue_mask_scale"])
        if "complexity" in groups:
            for m in stored_methods(g):  # CAMs on every tile, attributions on the sampled ones
                have, maps = read_maps(g, m, ids)
                if not have.any():
                    continue
                cells = tissue_cells(df[have], sdir / "tissue.png", scale, *maps.shape[1:])
                for name, fn in (("gini", M.gini), ("entropy", M.entropy)):
                    col = np.full(len(df), np.nan, np.float32)
                    col[have] = fn(maps)
                    out[f"{m}:{name}"] = col
                col = np.full(len(df), np.nan, np.float32)
                col[have] = M.mass_share(maps, cells)
                out[f"{m}:tissue_share"] = col
        if "ensemble" in groups and "ensemble" in g:
            probs = np.asarray(g["ensemble/probs"].oindex[ids], np.float32)
            labels = df["label_pos"].to_numpy(np.float64) if "label_pos" in df.columns else None
            sp = M.ensemble_spread(probs, np.zeros((len(ids), 1, 1)), positive=positive, labels=labels)
            for k in ("prob_mean", "prob_std", "acc_mean", "acc_std"):
                if k in sp:
                    out[f"ensemble:{k}"] = sp[k]
            for key in g["ensemble/cams"].keys() if "ensemble/cams" in g else []:
                if key.endswith("_std"):
                    std = np.asarray(g[f"ensemble/cams/{key}"].oindex[ids], np.float32)
                    out[f"{key[:-4]}:attn_std"] = std.reshape(len(ids), -1).mean(1)
        parts.append(out)
    return pd.concat(parts).reindex(tiles.index) if parts else pd.DataFrame(index=tiles.index)


def _aggregate(wide: pd.DataFrame, cfg: ScoreConfig) -> pd.DataFrame:
    rows = []
    cols = [c for c in wide.columns if ":" in c]
    for c in cols:
        method, metric = c.split(":", 1)
        for cl, vals in list(wide.groupby("cluster")[c]) + [(COHORT_ROW, wide[c])]:
            v = vals.to_numpy(np.float64)
            v = v[np.isfinite(v)]
            if len(v) == 0:
                continue
            if len(v) > _NORMAL_ABOVE:
                mean, se = float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v)))
                ci = (mean, mean - 1.96 * se, mean + 1.96 * se, len(v))
            else:
                ci = M.bootstrap_ci(v, n_boot=cfg.n_boot, seed=cfg.seed)
            rows.append(
                {
                    "cluster": int(cl),
                    "method": method,
                    "metric": metric,
                    "value": ci[0],
                    "ci_low": ci[1],
                    "ci_high": ci[2],
                    "n_tiles": int(ci[3]),
                }
            )
    return pd.DataFrame(rows, columns=["cluster", "method", "metric", "value", "ci_low", "ci_high", "n_tiles"])


def _gains(wide: pd.DataFrame, cfg: ScoreConfig, methods: tuple[str, ...]) -> pd.DataFrame:
    """Each method's paired gain over each reference map on the same tiles, as aggregate rows with
    metric ``<metric>_gain_vs_<reference>`` (positive = better than the reference, whatever the
    metric's direction; mean and 95 % CI over the tiles, per cluster and for the cohort)."""
    cols = {}
    for ref in cfg.references:
        for c in [c for c in wide.columns if c.startswith(ref + ":")]:
            metric = c.split(":", 1)[1]
            higher = M.direction(metric)
            if higher is None:
                continue
            for m in methods:
                if f"{m}:{metric}" in wide.columns:
                    d = wide[f"{m}:{metric}"] - wide[c]
                    cols[f"{m}:{metric}_gain_vs_{ref}"] = d if higher else -d
    if not cols:
        return _aggregate(wide[["cluster"]], cfg)
    return _aggregate(pd.concat([wide[["cluster"]], pd.DataFrame(cols)], axis=1), cfg)


def _cohort_confounders(run: RunFolder, tiles: pd.DataFrame, cfg: ScoreConfig, outputs: list) -> list[str]:
    from wsi_explain.stages.score_confounders import cohort_confounders

    return cohort_confounders(run, tiles, cfg, outputs, cohort_row=COHORT_ROW)


def _removal(tiles: pd.DataFrame, cfg: ScoreConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    per_slide, per_cluster = M.cluster_removal(tiles, slide_labels=M.slide_labels(tiles), topk=cfg.topk)
    rows = []
    for _, r in per_cluster.iterrows():
        for k, v in r.items():
            if k in ("cluster", "n_tiles", "n_slides") or pd.isna(v):
                continue
            rows.append(
                {
                    "cluster": int(r["cluster"]),
                    "method": "model",
                    "metric": f"removal_{k}",
                    "value": float(v),
                    "ci_low": np.nan,
                    "ci_high": np.nan,
                    "n_tiles": int(r["n_tiles"]),
                }
            )
    return per_slide, pd.DataFrame(rows)


def _ensemble_fits(wide: pd.DataFrame) -> dict:
    if "ensemble:acc_mean" not in wide.columns:
        return {}
    out = {}
    for c in [c for c in wide.columns if c.endswith(":attn_std")]:
        m = c.split(":")[0]
        per_cluster = wide[wide["cluster"] >= 0].groupby("cluster")[[c, "ensemble:acc_mean", "ensemble:acc_std"]].mean()
        out[m] = {
            "tiles": M.fit_spread_relations(wide[c], wide["ensemble:acc_mean"], wide["ensemble:acc_std"]),
            "clusters": M.fit_spread_relations(
                per_cluster[c], per_cluster["ensemble:acc_mean"], per_cluster["ensemble:acc_std"]
            ),
        }
    return out


def read_cluster_metrics(run_path: str | Path) -> pd.DataFrame:
    """``cohort/cluster_metrics.parquet`` of a scored run."""
    return pd.read_parquet(Path(run_path) / "cohort" / "cluster_metrics.parquet")


def _cluster_inputs(run: RunFolder) -> tuple[dict, pd.DataFrame, dict]:
    """The clustering stage's record, the cohort tile table and its metadata; raises when the run
    is not clustered."""
    import pyarrow.parquet as pq

    crec = run.slide_record("cluster", COHORT)
    path = run.path / "cohort" / "tiles.parquet"
    if not crec or crec.get("status") != "done" or not path.exists():
        raise WsiExplainError(f"{run.path}: not clustered; run `wsi-explain cluster` first")
    return crec, pd.read_parquet(path), json.loads(pq.read_schema(path).metadata[b"wsi_explain"])


def _sampled_metrics(
    run: RunFolder,
    cfg: ScoreConfig,
    ecfg: ExtractConfig,
    ccfg: ClusterConfig,
    methods,
    tiles,
    positive: int,
    parts_dir: Path,
    progress,
) -> tuple[list, list]:
    """The expensive metrics on each cluster's sample -> (long value tables, sanity tables, one per
    cluster; the sample notes in words). Each cluster's result is written to ``parts_dir`` as it
    finishes, so a killed run resumes at the first cluster not done."""
    from wsi_explain.stages.score_sample import SampleScorer, sample_clusters

    groups = set(cfg.groups)
    if not (
        groups & {"faithfulness", "robustness", "localisation", "sanity"} or (groups & {"ensemble"} and cfg.models)
    ):
        return [], [], []
    samples = sample_clusters(tiles, per_cluster=cfg.per_cluster, seed=cfg.seed, include_noise=cfg.include_noise)
    parts_dir.mkdir(parents=True, exist_ok=True)
    long_parts, sanity_parts, notes = [], [], []
    scorer = None
    for i, (c, sample) in enumerate(samples.items()):
        progress("sampled metrics", i, len(samples))
        vpath, spath = parts_dir / f"cluster_{c}.parquet", parts_dir / f"sanity_{c}.parquet"
        npath = parts_dir / f"notes_{c}.json"
        if vpath.exists() and spath.exists() and npath.exists():  # done before the run was killed
            values, sanity = pd.read_parquet(vpath), pd.read_parquet(spath)
        else:
            if scorer is None:
                first = run.slide_dir(sample["slide_id"].iloc[0]) / "tiles.parquet"
                tile_px = int(pd.read_parquet(first, columns=["tile_px"])["tile_px"].iloc[0])
                scorer = SampleScorer(run.path, cfg, ecfg, methods, ccfg.positive_labels, tile_px)
                scorer.positive_class = positive
            values, sanity = scorer.score(c, sample)
            atomic_write_parquet(values, vpath)
            atomic_write_parquet(sanity, spath)
            atomic_write_json(npath, scorer.notes)  # last: the cluster's part is complete
        long_parts.append(values)
        sanity_parts.append(sanity)
        notes += json.loads(npath.read_text())
    progress("sampled metrics", len(samples), len(samples))
    return long_parts, sanity_parts, notes


def _merge_sampled(wide: pd.DataFrame, long_parts: list) -> int:
    """Adds one column per ``method:metric`` of the sampled tiles (NaN elsewhere) and ``sampled``
    to ``wide`` (in place); returns the number of sampled tiles."""
    if not (long_parts and any(len(p) for p in long_parts)):
        wide["sampled"] = False
        return 0
    long = pd.concat([p for p in long_parts if len(p)], ignore_index=True)
    long["col"] = long["method"] + ":" + long["metric"]
    piv = long.pivot_table(index=["slide_id", "tile_id"], columns="col", values="value", aggfunc="first")
    piv = piv.reindex(pd.MultiIndex.from_frame(wide[["slide_id", "tile_id"]].astype({"tile_id": np.int64})))
    wide["sampled"] = piv.notna().any(axis=1).to_numpy()
    for col in piv.columns:
        wide[col] = piv[col].to_numpy(np.float32)
    return int(wide["sampled"].sum())


def _sanity_summary(sanity_parts: list, cfg: ScoreConfig) -> tuple[pd.DataFrame, dict]:
    """Per-cluster sanity rows plus the cohort's (tile-weighted means), and the verdict per method
    (passes when Spearman after full randomisation is below ``cfg.sanity_threshold``)."""
    parts = [s for s in sanity_parts if len(s)]
    if not parts:
        return pd.DataFrame(), {}
    df = pd.concat(parts, ignore_index=True)
    w = df.assign(ws=df["spearman"] * df["n"], wss=df["ssim"] * df["n"])
    tot = w.groupby(["method", "step", "block"], as_index=False)[["ws", "wss", "n"]].sum()
    tot = tot.assign(cluster=COHORT_ROW, spearman=tot["ws"] / tot["n"], ssim=tot["wss"] / tot["n"])[df.columns]
    verdict = {}
    for m, g in tot.groupby("method"):
        last = g.sort_values("step").iloc[-1]
        verdict[m] = {
            "spearman": float(last["spearman"]),
            "ssim": float(last["ssim"]),
            "passed": bool(last["spearman"] < cfg.sanity_threshold),
        }
    return pd.concat([df, tot], ignore_index=True), verdict


def _write_tables(cdir: Path, wide: pd.DataFrame, agg: pd.DataFrame, meta: dict) -> pd.DataFrame:
    """Write ``tile_metrics.parquet`` (one row per tile) and ``cluster_metrics.parquet`` (sorted by
    cluster, method, metric), both with ``meta``; returns the sorted cluster table."""
    atomic_write_parquet(wide, cdir / "tile_metrics.parquet", meta)
    agg = agg.sort_values(["cluster", "method", "metric"], ignore_index=True)
    atomic_write_parquet(agg, cdir / "cluster_metrics.parquet", meta)
    return agg


def _fingerprint(cluster_record: dict) -> str:
    """The scoring's input fingerprint: the clustering's params, fingerprint and end time."""
    blob = json.dumps([cluster_record.get(k) for k in ("params", "fingerprint", "end")])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _skipped(rec: dict) -> ScoreOutcome:
    """The outcome of a rerun with the same inputs and parameters: the recorded figures and notes."""
    get = rec.get
    return ScoreOutcome(
        "skipped", get("n_rows", 0), get("n_sampled", 0), 0.0, get("sanity", {}), get("sample_notes", [])
    )


def score_params(cfg: ScoreConfig, ecfg: ExtractConfig, methods: tuple[str, ...]) -> str:
    """The score stage's params hash: its config, the methods scored, and those methods' own
    options from the extraction config (Integrated Gradients' steps), which change the scores."""
    from wsi_explain.explain.extractors import method_options

    opts = {m: o for m in methods if (o := method_options(ecfg, m, fixed=True))}
    return params_hash({**cfg.result_params(), "methods": list(methods), **({"method_options": opts} if opts else {})})


def run_score_stage(
    run: RunFolder, cfg: ScoreConfig, *, on_progress: Callable[[str, int, int], None] | None = None
) -> ScoreOutcome:
    """Score every cluster of a clustered run (see the module docstring for the outputs)."""
    from wsi_explain.explain.extractors import split_methods

    t0 = time.perf_counter()
    crec, tiles, cmeta = _cluster_inputs(run)
    cdir = run.path / "cohort"
    ccfg = ClusterConfig(**cmeta["config"])
    ecfg = ExtractConfig(**run.manifest["config"]["extract"])
    methods = tuple(cfg.methods or ecfg.methods)
    split_methods(methods)  # unknown names stop here, before any work
    params = score_params(cfg, ecfg, methods)
    fp = _fingerprint(crec)
    run.set_config(STAGE, cfg.model_dump(mode="json"))
    if run.is_done(STAGE, COHORT, params=params, fingerprint=fp):
        return _skipped(run.slide_record(STAGE, COHORT))
    start = now_iso()
    progress = on_progress or (lambda what, done, total: None)
    groups = set(cfg.groups)
    positive = min(ccfg.positive_class, len(cmeta.get("class_names") or [0, 1]) - 1)
    wide = pd.concat([tiles[["slide_id", "tile_id", "cluster"]], _cheap_metrics(run, tiles, cfg, positive)], axis=1)
    progress("cheap metrics", 1, 1)
    parts = _sampled_metrics(run, cfg, ecfg, ccfg, methods, tiles, positive, cdir / ".score_parts" / params, progress)
    n_sampled = _merge_sampled(wide, parts[0])
    agg = pd.concat([_aggregate(wide, cfg), _gains(wide, cfg, methods)], ignore_index=True)
    outputs = ["cohort/cluster_metrics.parquet", "cohort/tile_metrics.parquet"]
    if "removal" in groups and "prob_pos" in tiles.columns:
        per_slide, rem_rows = _removal(tiles, cfg)
        atomic_write_parquet(per_slide, cdir / "cluster_removal.parquet")
        agg = pd.concat([agg, rem_rows], ignore_index=True)
        outputs.append("cohort/cluster_removal.parquet")
    notes = _cohort_confounders(run, tiles, cfg, outputs) if "confounders" in groups and "prob_pos" in tiles else []
    sanity_df, sanity_verdict = _sanity_summary(parts[1], cfg)
    if len(sanity_df):
        atomic_write_parquet(sanity_df, cdir / "sanity.parquet")
        outputs.append("cohort/sanity.parquet")
    if "ensemble" in groups and (fits := _ensemble_fits(wide)):
        atomic_write_json(cdir / "ensemble_fit.json", fits)
        outputs.append("cohort/ensemble_fit.json")
    meta = {"config": cfg.model_dump(mode="json"), "methods": list(methods), "sanity": sanity_verdict}
    agg = _write_tables(cdir, wide, agg, {**meta, "cohort_row": COHORT_ROW, "positive_class": positive})
    shutil.rmtree(cdir / ".score_parts", ignore_errors=True)
    out = ScoreOutcome("done", len(agg), n_sampled, time.perf_counter() - t0, sanity_verdict, parts[2])
    run.record(
        STAGE,
        COHORT,
        status="done",
        params=params,
        fingerprint=fp,
        outputs=outputs,
        n_rows=len(agg),
        n_sampled=n_sampled,
        methods=list(methods),
        sanity=sanity_verdict,
        confounder_notes=notes,
        sample_notes=parts[2],
        start=start,
        end=now_iso(),
        seconds=round(out.seconds, 3),
        error=None,
    )
    return out
