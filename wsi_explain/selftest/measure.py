"""What the audit found in a self-test cohort, against what was planted.

Per plant kind:

- ``shortcut_auroc``: how far the shortcut model leans on the plant (AUROC of its positive
  probability, planted tiles against the clean tiles of the same slides' kind). Near 0.5 the
  model did not learn the shortcut and the other figures say little.
- ``recall``: share of the planted tiles that lie in clusters flagged ``artefact_positive`` or in
  a flagged artefact slice (:mod:`clustering.slices`: all tiles showing one artefact, wherever
  they were clustered, flagged when the model leans on them); ``recall_clusters``: by the
  cluster flags alone.
- ``precision``: share of the tiles flagged for this kind of artefact (clusters flagged
  ``artefact_positive`` with the kind among their ``artefact_kinds``, and the kind's slice when
  flagged) that carry the plant.
- ``removal_rank``: rank, by the cluster-removal effect (how far removing a cluster moves some
  slide's top-k score), of the first cluster whose tiles are mostly planted with this kind
  (1 = removal names it first; NaN when no cluster is mostly planted).
- ``scan_first`` / ``scan_found``: the variable the confounder scan names first on this kind's
  slides (largest |Spearman| of the positive probability over the label strata), and whether it
  is one that measures the plant (:data:`tiling.plants.PLANT_VARIABLES`).

For the cohort: flagged clusters and the share of flagged tiles that are planted (precision over
all kinds); for a control cohort (nothing planted) every flag is a false flag.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from tiling.plants import PLANT_VARIABLES
from wsi_explain.metrics.confounders import QC_VARIABLES, scan_confounders

__all__ = ["planted_tiles", "kind_figures", "cohort_figures", "SLICE_KINDS"]

#: the artefact slices of clustering (:func:`clustering.artefact_slices`)
SLICE_KINDS = ("ink", "blur", "stain", "low_tissue")


def planted_tiles(tiles: pd.DataFrame, design: pd.DataFrame, *, tile_px: int) -> pd.DataFrame:
    """The clustered tile table with the design's ``kind``, ``planted`` and ``source`` per tile
    (tiles in the glass margin, if any, are dropped)."""
    from wsi_explain.selftest.cohort import cell_of

    per_slide = int(design.groupby("slide_id").size().max())
    cell = cell_of(tiles["x"].to_numpy(), tiles["y"].to_numpy(), tile_px=tile_px, tiles_per_slide=per_slide)
    t = tiles.assign(cell=cell).drop(columns=[c for c in ("kind", "planted", "source") if c in tiles])
    return t.merge(design[["slide_id", "cell", "kind", "planted", "source"]], on=["slide_id", "cell"], how="inner")


def _auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    from scipy.stats import mannwhitneyu

    if not len(pos) or not len(neg):
        return float("nan")
    return float(mannwhitneyu(pos, neg).statistic / (len(pos) * len(neg)))


def _flagged(clusters: pd.DataFrame, kind: str | None = None) -> set[int]:
    out = set()
    for r in clusters.itertuples():
        if r.cluster >= 0 and "artefact_positive" in list(r.flags):
            if kind is None or kind in list(r.artefact_kinds):
                out.add(int(r.cluster))
    return out


def _scan(tiles: pd.DataFrame, kind: str, *, n_boot: int, seed: int) -> dict:
    """The confounder scan on this kind's slides: the variable named first and the planted one's
    strongest correlation with its interval."""
    sub = tiles[tiles["kind"] == kind]
    scan, _ = scan_confounders(sub.drop(columns=["cluster"]), n_boot=n_boot, seed=seed)
    rows = scan[(scan["cluster"] == -2) & scan["variable"].isin(QC_VARIABLES) & scan["rho"].notna()]
    if not len(rows):
        return {"scan_first": None, "scan_found": False, "scan_rho": float("nan"), "scan_ci": [np.nan, np.nan]}
    best = rows.loc[rows["rho"].abs().groupby(rows["variable"]).idxmax()]
    best = best.assign(a=best["rho"].abs()).sort_values("a", ascending=False, kind="stable")
    mine = best[best["variable"].isin(PLANT_VARIABLES[kind])]
    first = str(best["variable"].iloc[0])
    return {
        "scan_first": first,
        "scan_found": first in PLANT_VARIABLES[kind],
        "scan_rank": int(np.flatnonzero(best["variable"].isin(PLANT_VARIABLES[kind]).to_numpy())[0]) + 1
        if len(mine)
        else None,
        "scan_variable": str(mine["variable"].iloc[0]) if len(mine) else None,
        "scan_stratum": str(mine["stratum"].iloc[0]) if len(mine) else None,
        "scan_rho": float(mine["rho"].iloc[0]) if len(mine) else float("nan"),
        "scan_ci": [float(mine["ci_low"].iloc[0]), float(mine["ci_high"].iloc[0])] if len(mine) else [np.nan, np.nan],
    }


def _in_slice(tiles: pd.DataFrame, kind: str) -> np.ndarray:
    """(n,) bool: the tiles in the flagged artefact slice of ``kind`` (column ``slice_<kind>``,
    added from clustering's slices; none when the slice is not flagged or not known)."""
    col = f"slice_{kind}"
    return tiles[col].to_numpy(bool) if col in tiles else np.zeros(len(tiles), bool)


def kind_figures(tiles: pd.DataFrame, clusters: pd.DataFrame, kind: str, *, n_boot: int = 200, seed: int = 0) -> dict:
    """The figures of one plant kind (see the module docstring) on a cohort from :func:`planted_tiles`;
    the flagged artefact slices (``slice_<kind>`` columns) count as flags too."""
    mine = tiles["kind"] == kind
    planted = (mine & tiles["planted"]).to_numpy()
    by_cluster = tiles["cluster"].isin(_flagged(clusters)).to_numpy()
    any_slice = np.zeros(len(tiles), bool)
    for k in SLICE_KINDS:
        any_slice |= _in_slice(tiles, k)
    flagged = by_cluster | any_slice
    for_kind = tiles["cluster"].isin(_flagged(clusters, kind)).to_numpy() | _in_slice(tiles, kind)
    effect = clusters[clusters["cluster"] >= 0].sort_values("removal_effect", ascending=False, kind="stable")
    share = tiles.assign(p=planted).groupby("cluster")["p"].mean()
    order = [int(c) for c in effect["cluster"]]
    mostly = [i + 1 for i, c in enumerate(order) if share.get(c, 0.0) >= 0.5]
    out = {
        "kind": kind,
        "n_planted": int(planted.sum()),
        "n_clean": int((mine & ~tiles["planted"]).sum()),
        "shortcut_auroc": _auroc(
            tiles.loc[planted, "prob_pos"].to_numpy(), tiles.loc[mine & ~tiles["planted"], "prob_pos"].to_numpy()
        ),
        "recall": float(flagged[planted].mean()) if planted.any() else float("nan"),
        "recall_clusters": float(by_cluster[planted].mean()) if planted.any() else float("nan"),
        "precision": float(planted[for_kind].mean()) if for_kind.any() else float("nan"),
        "n_flagged_for_kind": int(for_kind.sum()),
        "removal_rank": mostly[0] if mostly else None,
        "removal_first": bool(mostly and mostly[0] == 1),
    }
    out.update(_scan(tiles, kind, n_boot=n_boot, seed=seed))
    return out


def cohort_figures(tiles: pd.DataFrame, clusters: pd.DataFrame, slices=None) -> dict:
    """Flagged clusters, flagged artefact slices and their tiles in a self-test cohort, and the share
    of flagged tiles that are planted."""
    flagged = _flagged(clusters)
    in_flagged = tiles["cluster"].isin(flagged).to_numpy().copy()
    for k in SLICE_KINDS:
        in_flagged |= _in_slice(tiles, k)
    flagged_slices = [] if slices is None else [str(k) for k in slices.loc[slices["flagged"], "kind"]]
    reasons = {
        f"cluster {int(r.cluster)}": list(r.flag_reasons)
        for r in clusters.itertuples()
        if int(r.cluster) in flagged and len(r.flag_reasons)
    }
    if slices is not None:
        for r in slices[slices["flagged"]].itertuples():
            reasons[f"{r.kind} tiles"] = [str(r.reason)]
    return {
        "n_tiles": int(len(tiles)),
        "n_clusters": int((clusters["cluster"] >= 0).sum()),
        "n_planted": int(tiles["planted"].sum()),
        "flagged_clusters": sorted(flagged),
        "flagged_slices": flagged_slices,
        "flagged_tiles": int(in_flagged.sum()),
        "precision": float(tiles["planted"].to_numpy()[in_flagged].mean()) if in_flagged.any() else float("nan"),
        "recall": float(in_flagged[tiles["planted"].to_numpy()].mean()) if tiles["planted"].any() else float("nan"),
        "flag_reasons": reasons,
    }
