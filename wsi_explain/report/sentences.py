"""Metric rows in words, for the CLI summary and the report pages."""

from __future__ import annotations

__all__ = ["gain_sentences"]


def gain_sentences(rows) -> list[str]:
    """``rows``: a DataFrame of ``cluster_metrics`` rows (method, metric, value, ci_low, ci_high,
    n_tiles). One sentence per method and metric from the ``<metric>_gain_vs_<reference>`` rows of
    ``cluster_metrics`` (one cluster's or the cohort's): better than the reference by X [CI] when
    the interval is above 0, worse when below, else not distinguishable."""
    out = []
    for _, r in rows[rows["metric"].str.contains("_gain_vs_")].iterrows():
        metric, ref = r["metric"].rsplit("_gain_vs_", 1)
        ci = f"{r['value']:+.3g} [{r['ci_low']:+.3g}, {r['ci_high']:+.3g}] over {r['n_tiles']} tiles"
        if r["ci_low"] > 0:
            verdict = "better than"
        elif r["ci_high"] < 0:
            verdict = "WORSE than"
        else:
            verdict = "not distinguishable from"
        out.append(f"{r['method']}: {metric} {verdict} the {ref} map ({ci})")
    return out
