"""The self-test's figures (``cohort/selftest.json``) as table rows and sentences, for the CLI
and the report."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["read_selftest", "selftest_rows", "selftest_sentences", "SELFTEST_HEADER"]

#: columns of :func:`selftest_rows`
SELFTEST_HEADER = ("plant", "tiles", "model leans (AUROC)", "recall", "precision", "removal rank", "scan names first")


def read_selftest(cohort_dir) -> dict | None:
    """The figures of ``cohort_dir/selftest.json``, or None when the run has no self-test."""
    p = Path(cohort_dir) / "selftest.json"
    return json.loads(p.read_text()) if p.exists() else None


def _f(v, fmt: str = ".2f") -> str:
    return "-" if v is None or v != v else format(v, fmt)


def selftest_rows(figures: dict) -> list[tuple[str, ...]]:
    """One row of :data:`SELFTEST_HEADER` per plant kind of the planted cohort (strings)."""
    rows = []
    for kind, k in figures["planted"]["kinds"].items():
        scan = k.get("scan_first") or "-"
        scan += (
            " (yes)" if k.get("scan_found") else f" (no; {k.get('scan_variable') or '-'} #{k.get('scan_rank') or '-'})"
        )
        rows.append(
            (
                kind,
                str(k["n_planted"]),
                _f(k["shortcut_auroc"]),
                _f(k["recall"]),
                _f(k["precision"]),
                str(k["removal_rank"]) if k["removal_rank"] is not None else "-",
                scan,
            )
        )
    return rows


def selftest_sentences(figures: dict) -> list[str]:
    """The cohort-level figures and the control's false flags in words."""
    p = figures["planted"]
    out = [
        f"planted cohort: {p['n_tiles']} tiles ({p['n_planted']} planted) in {figures['design']['n_slides']} slides; "
        f"{len(p['flagged_clusters'])} of {p['n_clusters']} clusters flagged (artefact the model leans on), "
        f"holding {p['flagged_tiles']} tiles: recall {_f(p['recall'])}, precision {_f(p['precision'])} "
        "over all plant kinds"
    ]
    if p.get("flagged_slices"):
        out[0] += f"; artefact slices flagged: {', '.join(p['flagged_slices'])}"
    c = figures.get("control")
    if c is not None:
        if c["flagged_clusters"] or c.get("flagged_slices"):
            out.append(
                f"control cohort (nothing planted): {len(c['flagged_clusters']) + len(c.get('flagged_slices', []))} "
                "FALSE flag(s) on "
                f"{c['flagged_tiles']} tiles: "
                + "; ".join(f"{k}: {' / '.join(v)}" for k, v in c["flag_reasons"].items())
            )
        else:
            out.append(f"control cohort (nothing planted): no artefact flag in {c['n_clusters']} clusters")
    weak = [
        k for k, v in p["kinds"].items() if v["shortcut_auroc"] == v["shortcut_auroc"] and v["shortcut_auroc"] < 0.7
    ]
    if weak:
        out.append(
            f"the shortcut model barely leans on {', '.join(weak)} (AUROC < 0.7): those rows say little about the audit"
        )
    return out
