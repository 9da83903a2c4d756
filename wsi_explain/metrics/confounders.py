"""Confounder scan: does the model's output follow a nuisance variable within a label stratum?

For a nuisance variable (a QC measure per tile, a site or scanner per slide, any column the user
names) and the positive probability, the rank correlation over the tiles of one stratum (the slides
of one label, optionally one cluster) says whether the output moves with the nuisance where the
biology is held fixed. Tiles of a slide are not independent, so the confidence interval comes from
a bootstrap over slides (never over tiles).

Vectorised: the variables are ranked once per stratum; a bootstrap resample of slides is a vector
of slide weights, and the weighted Pearson correlation of the ranks over a resample needs only
per-slide sums (count, sum x, sum y, sum x^2, sum y^2, sum xy), so B resamples cost one
(B x slides) @ (slides x 6) product, whatever the number of tiles. The weighted correlation of the
stratum's ranks is the Spearman correlation for the full sample and a close approximation for a
resample (ranks are not recomputed per resample).
"""

from __future__ import annotations

import numpy as np

from clustering.summary import SITE_COLUMNS

__all__ = ["rank_correlation_by_slide"]


def _ranks(v: np.ndarray) -> np.ndarray:
    """Average ranks (ties shared), float64."""
    from scipy.stats import rankdata

    return rankdata(v, method="average").astype(np.float64)


def _corr_from_sums(s: np.ndarray) -> np.ndarray:
    """Pearson correlation from sums (..., 6): n, sx, sy, sxx, syy, sxy; NaN where undefined."""
    n, sx, sy, sxx, syy, sxy = np.moveaxis(s, -1, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = sxy - sx * sy / n
        vx, vy = sxx - sx * sx / n, syy - sy * sy / n
        r = cov / np.sqrt(vx * vy)
    return np.where((vx > 1e-12 * np.maximum(n, 1) ** 3) & (vy > 1e-12 * np.maximum(n, 1) ** 3), r, np.nan)


def rank_correlation_by_slide(
    values: np.ndarray,
    prob: np.ndarray,
    slides: np.ndarray,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    min_slides: int = 3,
) -> dict:
    """Spearman correlation of ``values`` with ``prob`` over tiles, with a bootstrap over slides.

    Parameters
    ----------
    values : (N,) float
        The nuisance variable per tile (NaN = missing: those tiles are left out).
    prob : (N,) float
        The model's positive probability per tile.
    slides : (N,) slide ids (any hashable dtype): the resampling unit.
    n_boot : int, keyword-only
        Bootstrap resamples of the slides (with replacement).
    seed : int
    min_slides : int
        Below this many slides no interval is given (NaN), the estimate still is.

    Returns
    -------
    dict with ``rho`` (float, NaN when a variable is constant), ``ci_low``, ``ci_high`` (95 %
    percentile interval over slides), ``n_tiles``, ``n_slides``.
    """
    codes = np.unique(np.asarray(slides), return_inverse=True)[1]
    return _rank_corr(
        np.asarray(values, np.float64), np.asarray(prob, np.float64), codes, None, n_boot, seed, min_slides
    )


def _rank_corr(v, p, codes, p_ranks, n_boot: int, seed: int, min_slides: int) -> dict:
    """:func:`rank_correlation_by_slide` on integer slide codes; ``p_ranks``: the ranks of ``p``
    when already known (every value finite), reused across variables."""
    keep = np.isfinite(v) & np.isfinite(p)
    out = {"rho": np.nan, "ci_low": np.nan, "ci_high": np.nan, "n_tiles": int(keep.sum()), "n_slides": 0}
    if keep.sum() < 3:
        return out
    if not keep.all():
        v, p, codes, p_ranks = v[keep], p[keep], codes[keep], None
    present = np.bincount(codes) > 0
    k = len(present)
    out["n_slides"] = int(present.sum())
    x, y = _ranks(v), (p_ranks if p_ranks is not None else _ranks(p))
    sums = np.stack(
        [np.bincount(codes, weights=c, minlength=k) for c in (np.ones_like(x), x, y, x * x, y * y, x * y)], 1
    )
    sums = sums[present]
    out["rho"] = float(_corr_from_sums(sums.sum(0)))
    m = len(sums)
    if m >= min_slides and np.isfinite(out["rho"]):
        draws = np.random.default_rng(seed).integers(0, m, (n_boot, m))  # slides drawn, with replacement
        flat = (draws + m * np.arange(n_boot)[:, None]).ravel()
        counts = np.bincount(flat, minlength=n_boot * m).reshape(n_boot, m).astype(np.float64)
        boot = _corr_from_sums(counts @ sums)
        boot = boot[np.isfinite(boot)]
        if len(boot):
            out["ci_low"], out["ci_high"] = (float(q) for q in np.percentile(boot, [2.5, 97.5]))
    return out


#: per-tile QC measures scanned when present (tiling.QC_COLUMNS)
QC_VARIABLES = (
    "tissue_frac",
    "ink_frac",
    "sharpness",
    "od_h",
    "od_e",
    "h_p90",
    "e_p90",
    "he_p10",
    "brightness",
    "stained_frac",
)
#: slide-level columns read as a site, provider or scanner when present (the clustering's list)
SITE_LIKE = SITE_COLUMNS
SCAN_COLUMNS = ["cluster", "stratum", "variable", "rho", "ci_low", "ci_high", "n_tiles", "n_slides", "note"]


def _variables(tiles, nuisance: tuple[str, ...], notes: list[str]) -> dict[str, np.ndarray]:
    """Numeric columns as they are; categorical ones as one indicator per level ("site=A")."""
    import pandas as pd

    out: dict[str, np.ndarray] = {}
    names = [c for c in QC_VARIABLES + SITE_LIKE if c in tiles.columns]
    for c in nuisance:
        if c not in tiles.columns:
            notes.append(f"nuisance column {c!r} is not in the cohort table (cohort CSV columns); not scanned")
        elif c not in names:
            names.append(c)
    for c in names:
        col = tiles[c]
        missing = tiles.loc[col.isna(), "slide_id"].nunique()
        if missing:
            notes.append(f"{c}: missing on {missing} slide(s); scanned on the others")
        if pd.api.types.is_numeric_dtype(col) and c not in SITE_LIKE:
            out[c] = col.to_numpy(np.float64)
            continue
        levels = sorted(col.dropna().astype(str).unique())
        if len(levels) < 2:
            notes.append(f"{c}: one value in the whole cohort ({levels[0] if levels else 'none'}); not scanned")
            continue
        for lv in levels:
            out[f"{c}={lv}"] = np.where(col.isna(), np.nan, (col.astype(str) == lv).to_numpy(np.float64))
    return out


def scan_confounders(tiles, *, nuisance: tuple[str, ...] = (), n_boot: int = 1000, seed: int = 0, cohort_row: int = -2):
    """The confounder scan of a cohort table (one row per tile: ``slide_id``, ``prob_pos``,
    ``cluster``, ``label`` when known, and the nuisance columns).

    Every nuisance variable is correlated with the positive probability within each label stratum
    (all tiles in one stratum when there are no labels), over the cohort (``cluster`` =
    ``cohort_row``) and within each cluster, with a 95 % interval from a bootstrap over slides.

    Returns
    -------
    (DataFrame with :data:`SCAN_COLUMNS`, sorted by cluster then |rho| descending; list of notes in
    words: no labels, missing or constant columns)
    """
    import pandas as pd

    notes: list[str] = []
    variables = _variables(tiles, tuple(nuisance), notes)
    if "label" in tiles.columns and tiles["label"].notna().any():
        codes, names = pd.factorize(tiles["label"].astype("string").fillna("unlabelled"), sort=True)
    else:
        notes.append("no slide labels: the scan runs on predictions alone (one stratum, all slides)")
        codes, names = np.zeros(len(tiles), np.int64), np.array(["all"])
    prob = tiles["prob_pos"].to_numpy(np.float64)
    slides = pd.factorize(tiles["slide_id"])[0]
    clusters = tiles["cluster"].to_numpy() if "cluster" in tiles.columns else np.zeros(len(tiles), int)
    groups = [(cohort_row, np.ones(len(tiles), bool))] + [(int(c), clusters == c) for c in np.unique(clusters)]
    rows = []
    for cl, in_group in groups:
        for si in np.unique(codes[in_group]):
            sel, st = in_group & (codes == si), names[si]
            p = prob[sel]
            p_ranks = _ranks(p) if np.isfinite(p).all() else None  # shared by the variables
            for name, v in variables.items():
                vv = v[sel]
                finite = vv[np.isfinite(vv)]
                const = len(finite) == 0 or np.ptp(finite) == 0
                r = _rank_corr(vv, p, slides[sel], p_ranks, n_boot, seed, 3)
                note = (
                    "constant in this stratum"
                    if const
                    else ("fewer than 3 slides: no interval" if r["n_slides"] < 3 else "")
                )
                rows.append({"cluster": cl, "stratum": str(st), "variable": name, **r, "note": note})
    df = pd.DataFrame(rows, columns=SCAN_COLUMNS)
    if len(df):
        df = df.assign(_a=-df["rho"].abs().fillna(-1)).sort_values(["cluster", "_a"]).drop(columns="_a")
    return df.reset_index(drop=True), notes
