"""``wsi-explain selftest RUN``: plant known shortcuts into the run's own tiles and measure what the
audit finds.

1. A seeded sample of the run's clean tiles (no ink, in focus, mostly tissue by the tiling QC) is
   rearranged into small slides (:mod:`wsi_explain.selftest.cohort`); pen ink, blur and a stain
   shift are planted into copies of some of them, correlated with a synthetic slide label.
2. A shortcut model: the run's model with its classifier refitted on the synthetic labels of a
   training cohort of the same design built from other clean tiles with other plants
   (:mod:`wsi_explain.selftest.head`), so that it carries the shortcut to unseen slides.
3. The audit runs on the planted cohort as on any other: tiling with QC and ink detection,
   extraction with the shortcut model, clustering with its flags, artefact slices and cluster
   removal, and the confounder scan.
4. Recall, precision, removal ranks and scan ranks per plant kind
   (:mod:`wsi_explain.selftest.measure`); the same on a control cohort (the same tiles, nothing
   planted), whose flags are all false flags. The figures go to ``cohort/selftest.json``; the
   cohorts' own run folders stay under ``selftest/`` of the run.

A rerun reuses what is done: the cohorts' run folders skip the stages whose inputs are unchanged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

import clustering
from wsi_explain.core.atomic import atomic_write_json
from wsi_explain.core.errors import WsiExplainError
from wsi_explain.core.run import RunFolder, now_iso
from wsi_explain.core.stage_configs import SelftestConfig

__all__ = ["run_selftest", "clean_sources", "SELFTEST_JSON"]

logger = logging.getLogger(__name__)

SELFTEST_JSON = "cohort/selftest.json"


def clean_sources(run: RunFolder, *, max_ink: float = 0.05, min_sharpness: float = 0.06, min_tissue: float = 0.9):
    """The run's clean tiles: (DataFrame of tile rows with ``slide_path`` and ``level0_mpp``, notes)."""
    from wsi_explain.io.tile_table import read_tile_table

    frames = []
    for sid, rec in sorted(run.stage("tile")["slides"].items()):
        if rec.get("status") != "done":
            continue
        t, meta = read_tile_table(run.slide_dir(sid) / "tiles.parquet")
        keep = t["tissue_frac"] >= min_tissue
        if "ink_frac" in t:
            keep &= t["ink_frac"] < max_ink
        if "sharpness" in t:
            keep &= t["sharpness"] >= min_sharpness
        frames.append(t[keep].assign(slide_id=sid, slide_path=meta["slide_path"], level0_mpp=meta.get("level0_mpp")))
    if not frames or not sum(len(f) for f in frames):
        raise WsiExplainError(f"{run.path}: no clean tile (tissue >= {min_tissue}, no ink, in focus) to plant into")
    return pd.concat(frames, ignore_index=True)


def _read_images(sources: pd.DataFrame, rows: np.ndarray) -> np.ndarray:
    """(len(rows), px, px, 3) uint8 tiles of the source table, read through OpenSlide."""
    from tiling import open_slide
    from tiling.grid import read_tile

    out = None
    for path, idx in pd.Series(rows).groupby(sources["slide_path"].to_numpy()[rows]).groups.items():
        reader = open_slide(path)
        try:
            for i in idx:
                img = read_tile(reader, sources.iloc[rows[i]])[..., :3]
                if out is None:
                    out = np.empty((len(rows), *img.shape), np.uint8)
                out[i] = img
        finally:
            reader.close()
    return out


def _audit(arm_dir: Path, csv: Path, base: dict, head: dict, *, seed: int, workers: int) -> tuple:
    """Tile, extract with the shortcut model ``head``, cluster one self-test cohort; its tiles (with a
    ``slice_<kind>`` column per artefact slice, true in the flagged ones), clusters and slices."""
    from wsi_explain.core.config import ClusterConfig, ExtractConfig, TileConfig
    from wsi_explain.io.slides import discover_slides
    from wsi_explain.stages.cluster import run_cluster_stage
    from wsi_explain.stages.extract import run_extract_stage
    from wsi_explain.stages.tile import run_tile_stage

    t = base["tile"]
    tile_um = t["tile_px"] * t["mpp_target"]  # the mask must resolve one tile, and one tile is tissue enough
    tcfg = TileConfig(
        **{
            **t,
            **{"verify": "none", "drop_artefacts": False, "qc": True, "find_ink": True},
            "tissue_mpp": min(t["tissue_mpp"], max(1.0, tile_um / 8)),
            "min_object_um2": min(t["min_object_um2"], tile_um**2),
        }
    )
    with RunFolder(arm_dir / "run") as sub:
        tiled = run_tile_stage(sub, discover_slides([csv]), tcfg)
        bad = [f"{r.slide_id}: {r.error}" for r in tiled if r.status == "failed"]
        if bad:
            raise WsiExplainError(f"{arm_dir}: the self-test cohort failed to tile: {'; '.join(bad)}")
        ecfg = ExtractConfig(
            arch=base["extract"]["arch"],
            weights=head["weights"],
            target_layer=base["extract"].get("target_layer"),
            methods=("gradcam",),
            workers=workers,
            seed=seed,
        )
        run_extract_stage(sub, ecfg)
        run_cluster_stage(sub, ClusterConfig(seed=seed))
    tiles = pd.read_parquet(arm_dir / "run" / "cohort" / "tiles.parquet")
    clusters = pd.read_parquet(arm_dir / "run" / "cohort" / "clusters.parquet")
    slices = pd.read_parquet(arm_dir / "run" / "cohort" / "artefact_slices.parquet")
    flagged = set(slices.loc[slices["flagged"], "kind"])
    for kind, mask in clustering.artefact_masks(tiles).items():  # the tiles of each flagged slice
        tiles[f"slice_{kind}"] = mask & (kind in flagged)
    return tiles, clusters, slices


def _designs(n_sources: int, scfg: SelftestConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The audited cohort's design and the shortcut model's training design, on separate source
    tiles where the run has enough (else the training design draws from all of them)."""
    from wsi_explain.selftest.cohort import design_cohort

    kw = {"n_slides": scfg.n_slides, "tiles_per_slide": scfg.tiles_per_slide, "kinds": scfg.kinds}
    design = design_cohort(n_sources, **kw, seed=scfg.seed)
    rest = np.setdiff1d(np.arange(n_sources), design["source"].unique())
    pool = rest if len(rest) >= scfg.tiles_per_slide else np.arange(n_sources)
    train = design_cohort(len(pool), **kw, seed=scfg.seed + 1)
    return design, train.assign(source=pool[train["source"].to_numpy()])


def run_selftest(
    run: RunFolder,
    scfg: SelftestConfig | None = None,
    *,
    workers: int = 2,
    step: Callable[[str], contextlib.AbstractContextManager] | None = None,
) -> dict:
    """Plant shortcuts into the run's clean tiles, audit the planted cohort (and a control), and
    write the figures to ``cohort/selftest.json`` of ``run``; returns them (see the module docstring).

    ``step(message)`` gives a context manager shown while a step runs (a status line in the CLI).
    """
    from wsi_explain.selftest.cohort import WHOLE_SLIDE_KINDS, training_tiles, write_cohort
    from wsi_explain.selftest.head import fit_shortcut_model
    from wsi_explain.selftest.measure import cohort_figures, kind_figures, planted_tiles

    t0 = time.perf_counter()
    scfg = scfg or SelftestConfig()
    n_slides, tiles_per_slide, kinds, seed = scfg.n_slides, scfg.tiles_per_slide, scfg.kinds, scfg.seed
    cfg = run.manifest.get("config", {})
    if "tile" not in cfg or "extract" not in cfg:
        raise WsiExplainError(f"{run.path}: the self-test needs a run that was tiled and extracted")
    step = step or (lambda msg: contextlib.nullcontext())
    started = now_iso()
    with step("choosing clean tiles and planting shortcuts"):
        sources = clean_sources(run)
        design, train = _designs(len(sources), scfg)
        used, local = np.unique(np.r_[design["source"], train["source"]], return_inverse=True)
        images = _read_images(sources, used)  # only the tiles the designs use
        design, train = design.assign(source=local[: len(design)]), train.assign(source=local[len(design) :])
        mpp = float(cfg["tile"].get("mpp_target") or 10.0 / cfg["tile"]["magnification"])
        base = {"tile": {**cfg["tile"], "mpp_target": mpp, "magnification": None}, "extract": cfg["extract"]}
    figures: dict = {"started": started, "n_source_tiles": int(len(sources)), "kinds": list(kinds), "seed": seed}
    figures["design"] = {"n_slides": n_slides, "tiles_per_slide": tiles_per_slide, "share_pos": 0.5, "share_neg": 0.125}
    figures["design"]["whole_slide_kinds"] = [k for k in kinds if k in WHOLE_SLIDE_KINDS]
    figures["design"]["training_tiles_shared"] = bool(np.isin(train["source"], design["source"]).any())
    arms = [("planted", True)] + ([("control", False)] if scfg.control else [])
    for arm, planted in arms:
        arm_dir = run.path / "selftest" / arm
        csv = write_cohort(images, design, arm_dir / "slides", mpp=mpp, planted=planted, seed=seed)
        with step(f"fitting the {arm} cohort's shortcut model on its training tiles"):
            timgs, tlabels = training_tiles(images, train, mpp=mpp, planted=planted, seed=seed + 1)
            head = fit_shortcut_model(timgs, tlabels, base["extract"], arm_dir / "model", seed=seed)
            del timgs
        with step(f"auditing the {arm} cohort (tile, extract, cluster)"):
            tiles, clusters, slices = _audit(arm_dir, csv, base, head, seed=seed, workers=workers)
        d = design if planted else design.assign(planted=False)
        t = planted_tiles(tiles, d, tile_px=int(cfg["tile"]["tile_px"]))
        with step(f"measuring what the audit found in the {arm} cohort"):
            figures[arm] = {
                **cohort_figures(t, clusters, slices),
                "head_train_accuracy": head["train_accuracy"],
                "kinds": {k: kind_figures(t, clusters, k, n_boot=scfg.n_boot, seed=seed) for k in kinds},
                "folder": str((arm_dir / "run").relative_to(run.path)),
            }
    figures["finished"] = now_iso()
    (run.path / "cohort").mkdir(exist_ok=True)
    atomic_write_json(run.path / SELFTEST_JSON, json.loads(json.dumps(figures, default=_plain)))
    secs = round(time.perf_counter() - t0, 3)
    run.record("selftest", "cohort", status="done", outputs=[SELFTEST_JSON], seconds=secs, end=now_iso())
    return figures


def _plain(v):
    """JSON for numpy scalars (NaN stays NaN)."""
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(type(v).__name__)
