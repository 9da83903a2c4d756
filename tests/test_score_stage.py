"""The metrics stage on a small labelled, annotated cohort with an ensemble."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from tests.conftest import copy_run
from wsi_explain import RunFolder
from wsi_explain.core.config import ScoreConfig
from wsi_explain.stages.score import COHORT_ROW, run_score_stage

FAST = dict(
    per_cluster=6,
    steps=4,
    road_percentiles=(50,),
    infidelity_samples=3,
    sensitivity_samples=2,
    sanity_tiles=3,
    n_boot=100,
    baselines=("constant",),
)


@pytest.fixture(scope="module")
def scored(audit_run, tmp_path_factory):
    run_dir = copy_run(audit_run, tmp_path_factory.mktemp("scored") / "run")
    cfg = ScoreConfig(**FAST)
    with RunFolder(run_dir) as run:
        out = run_score_stage(run, cfg)
    return run_dir, cfg, out


def test_cluster_metrics_table(scored):
    run_dir, cfg, out = scored
    assert out.status == "done" and out.n_sampled > 0
    cm = pd.read_parquet(run_dir / "cohort/cluster_metrics.parquet")
    assert list(cm.columns) == ["cluster", "method", "metric", "value", "ci_low", "ci_high", "n_tiles"]
    tiles = pd.read_parquet(run_dir / "cohort/tiles.parquet")
    assert set(cm["cluster"]) == set(tiles["cluster"]) | {COHORT_ROW}
    assert set(cm["method"]) == {"gradcam", "hirescam", "saliency", "ensemble", "model", "random", "uniform"}
    for metric in (
        "deletion_auc_constant",
        "insertion_auc_constant",
        "dic_multiply",
        "iic_mask",
        "road_combined",
        "infidelity",
        "sensitivity",
        "sanity_spearman",
        "gini",
        "entropy",
        "tissue_share",
    ):
        assert metric in set(cm.loc[cm.method == "gradcam", "metric"]), metric
    ok = cm.dropna(subset=["ci_low"])
    assert ((ok.ci_low <= ok.value + 1e-9) & (ok.value <= ok.ci_high + 1e-9)).all()
    # sampled metrics: at most per_cluster tiles per cluster; cheap ones use every tile of the cluster
    del_rows = cm[(cm.metric == "deletion_auc_constant") & (cm.cluster >= 0)]
    assert (del_rows.n_tiles <= cfg.per_cluster).all()
    gini = cm[(cm.metric == "gini") & (cm.method == "gradcam") & (cm.cluster >= 0)].set_index("cluster")["n_tiles"]
    assert gini.to_dict() == tiles.groupby("cluster").size().to_dict()


def test_every_method_is_compared_with_reference_maps_on_the_same_tiles(scored):
    run_dir, cfg, _ = scored
    assert cfg.references == ("random", "uniform")
    cm = pd.read_parquet(run_dir / "cohort/cluster_metrics.parquet").set_index(["cluster", "method", "metric"])
    tm = pd.read_parquet(run_dir / "cohort/tile_metrics.parquet")
    # the references are scored with the faithfulness metrics only, on the methods' sampled tiles
    assert tm["random:deletion_auc_constant"].notna().sum() == tm["gradcam:deletion_auc_constant"].notna().sum()
    assert "random:sensitivity" not in tm.columns and "random:gini" not in tm.columns
    checked = 0
    for metric, sign in (("deletion_auc_constant", -1), ("insertion_auc_constant", 1), ("road_combined", 1)):
        for ref in ("random", "uniform"):
            d = sign * (tm[f"gradcam:{metric}"] - tm[f"{ref}:{metric}"])
            for c, vals in d.groupby(tm["cluster"]):
                vals = vals.dropna()
                if len(vals):
                    row = cm.loc[(c, "gradcam", f"{metric}_gain_vs_{ref}")]
                    assert row["value"] == pytest.approx(vals.mean(), abs=1e-6)  # paired, direction-aware
                    assert row["n_tiles"] == len(vals)
                    checked += 1
    assert checked >= 6
    # the two references are different maps (seeded): their deletion curves differ
    assert not np.allclose(tm["random:deletion_auc_constant"].dropna(), tm["uniform:deletion_auc_constant"].dropna())


def test_confounder_scan_over_slides(scored):
    import pyarrow.parquet as pq

    run_dir, _, _ = scored
    path = run_dir / "cohort/confounders.parquet"
    scan = pd.read_parquet(path)
    tiles = pd.read_parquet(run_dir / "cohort/tiles.parquet")
    cohort = scan[scan.cluster == COHORT_ROW]
    assert {"ink_frac", "sharpness", "tissue_frac"} <= set(cohort["variable"])
    assert set(scan["cluster"]) == {COHORT_ROW} | set(tiles["cluster"])
    assert set(cohort["stratum"]) == set(tiles["label"].astype(str))
    # each row's slide count is that of its stratum: the bootstrap unit is the slide
    per_label = tiles.groupby(tiles["label"].astype(str))["slide_id"].nunique()
    for _, r in cohort[cohort.variable == "ink_frac"].iterrows():
        assert r["n_slides"] == per_label[r["stratum"]]
    meta = json.loads(pq.read_schema(path).metadata[b"wsi_explain"])
    rec = json.loads((run_dir / "manifest.json").read_text())["stages"]["score"]["slides"]["cohort"]
    assert rec["confounder_notes"] == meta["notes"] and "cohort/confounders.parquet" in rec["outputs"]
    # the site tests: this cohort has two slides, one per site, so the probe says why it cannot run
    # (grouped folds need 2+ slides per site) and the composition test still runs over clusters
    assert tiles.groupby("slide_id")["site"].first().nunique() == 2
    leak = json.loads((run_dir / "cohort/site_leakage.json").read_text())
    assert leak["site_column"] == "site" and leak["note"].startswith("too few slides per site")
    assert any(n.startswith("site probe: too few slides per site") for n in rec["confounder_notes"])
    assert any("no CAM-weighted probe" in n for n in rec["confounder_notes"])  # no activations stored
    err = pd.read_parquet(run_dir / "cohort/error_clusters.parquet")  # where the model fails
    assert err["n_labelled"].sum() == tiles["label_pos"].notna().sum() and "removal_effect" in err.columns
    assert err["excess_errors"].is_monotonic_decreasing  # the clusters holding the failures first
    assert "cohort/error_clusters.parquet" in rec["outputs"]
    slides = pd.read_parquet(run_dir / "cohort/slide_errors.parquet")  # the slide-level errors
    assert set(slides["slide_id"]) == set(tiles["slide_id"]) and set(slides["error"]) <= {
        "",
        "false positive",
        "false negative",
    }
    assert {"slide_error_topk", "slide_error_share"} <= set(err.columns)
    comp = pd.read_parquet(run_dir / "cohort/site_composition.parquet")
    assert set(comp["cluster"]) == set(tiles["cluster"]) and comp["p_value"].between(0, 1).all()


def test_reference_maps_are_seeded_and_directions_known():
    from wsi_explain import metrics as M

    a = M.reference_maps("random", 3, (32, 48), seed=1)
    assert a.shape == (3, 32, 48) and a.dtype == np.float32
    np.testing.assert_array_equal(a, M.reference_maps("random", 3, (32, 48), seed=1))
    assert not np.allclose(a, M.reference_maps("random", 3, (32, 48), seed=2))
    # "random" is smooth like a 7 x 7 CAM; "uniform" breaks ties per pixel (rough)
    u = M.reference_maps("uniform", 3, (32, 48), seed=1)
    rough = lambda m: np.abs(np.diff(m, axis=-1)).mean() / m.std()  # noqa: E731
    assert rough(a) < 0.2 < rough(u)
    np.testing.assert_array_equal(M.reference_maps("random", 2, (32, 48), seed=1, first=1), a[1:])  # split-proof
    with pytest.raises(ValueError, match="unknown reference"):
        M.reference_maps("zeros", 1, (8, 8), seed=0)
    assert M.direction("deletion_auc_blur") is False and M.direction("insertion_auc_constant") is True
    assert M.direction("road_combined") is True and M.direction("gini") is None


def test_localisation_uses_the_annotation(scored):
    run_dir, _, _ = scored
    tm = pd.read_parquet(run_dir / "cohort/tile_metrics.parquet")
    assert "gradcam:pointing_game" in tm.columns
    pg = tm["gradcam:pointing_game"]
    # only tiles of the annotated slide that touch the tumour polygon get a value
    assert pg.notna().any() and set(tm.loc[pg.notna(), "slide_id"]) == {"generic"}
    assert set(pg.dropna().unique()) <= {0.0, 1.0}
    assert tm["gradcam:graded_hit"].dropna().isin([3.0, -1.0]).all()


def test_ensemble_removal_and_sanity_outputs(scored):
    run_dir, _, out = scored
    cm = pd.read_parquet(run_dir / "cohort/cluster_metrics.parquet")
    ens = cm[cm.method == "ensemble"]
    assert {"prob_std", "acc_mean", "acc_std"} <= set(ens.metric)
    assert (ens[ens.metric == "prob_std"].value > 0).all()  # the checkpoints differ
    fits = json.loads((run_dir / "cohort/ensemble_fit.json").read_text())
    assert set(fits) == {"gradcam", "hirescam"} and "r2" in fits["gradcam"]["tiles"]["attn_std~acc_mean"]
    rem = pd.read_parquet(run_dir / "cohort/cluster_removal.parquet")
    assert {"cluster", "slide_id", "d_mean", "d_topk"} <= set(rem.columns)
    assert "removal_d_auc_mean" in set(cm.metric)  # slide labels exist: cohort AUC change
    san = pd.read_parquet(run_dir / "cohort/sanity.parquet")
    assert set(san.method) == {"gradcam", "hirescam", "saliency"} and (san.step >= 1).all()
    assert set(out.sanity) == {"gradcam", "hirescam", "saliency"}
    assert all(isinstance(v["passed"], bool) for v in out.sanity.values())


def test_rerun_is_a_noop_and_new_params_recompute(scored, tmp_path):
    run_dir, cfg, _ = scored
    before = (run_dir / "cohort/cluster_metrics.parquet").stat().st_mtime_ns
    with RunFolder(run_dir) as run:
        assert run_score_stage(run, cfg).status == "skipped"
    assert (run_dir / "cohort/cluster_metrics.parquet").stat().st_mtime_ns == before
    other = copy_run(run_dir, tmp_path / "run")
    with RunFolder(other) as run:
        out = run_score_stage(run, ScoreConfig(**{**FAST, "groups": ("complexity",), "methods": ("gradcam",)}))
    assert out.status == "done" and out.n_sampled == 0
    cm = pd.read_parquet(other / "cohort/cluster_metrics.parquet")
    assert set(cm.method) == {"gradcam", "hirescam", "saliency"} and set(cm.metric) == {
        "gini",
        "entropy",
        "tissue_share",
    }


def test_results_do_not_depend_on_batch_size(audit_run, tmp_path):
    vals = []
    for bs in (1, 64):
        d = copy_run(audit_run, tmp_path / f"run{bs}")
        with RunFolder(d) as run:
            run_score_stage(
                run, ScoreConfig(**{**FAST, "groups": ("faithfulness",), "methods": ("gradcam",), "batch_size": bs})
            )
        vals.append(pd.read_parquet(d / "cohort/cluster_metrics.parquet"))
    a, b = vals
    pd.testing.assert_frame_equal(
        a[["cluster", "method", "metric", "n_tiles"]], b[["cluster", "method", "metric", "n_tiles"]]
    )
    np.testing.assert_allclose(a["value"], b["value"], atol=1e-5)


def test_killed_score_resumes_to_the_same_result(audit_run, tmp_path):
    """SIGKILL part way (after the first cluster's part is saved), rerun: equal to a clean run."""
    clean = copy_run(audit_run, tmp_path / "clean")
    cfg = dict(FAST, groups=("faithfulness", "complexity"), methods=("gradcam",))
    with RunFolder(clean) as run:
        run_score_stage(run, ScoreConfig(**cfg))
    killed = copy_run(audit_run, tmp_path / "killed")
    code = f"""
import os, signal
from wsi_explain import RunFolder
from wsi_explain.core.config import ScoreConfig
from wsi_explain.stages import score as score_stage
orig = score_stage.atomic_write_parquet
def write(df, path, meta=None):
    orig(df, path, meta)
    if path.name.startswith("sanity_"):
        os.kill(os.getpid(), signal.SIGKILL)
score_stage.atomic_write_parquet = write
with RunFolder({str(killed)!r}) as run:
    score_stage.run_score_stage(run, ScoreConfig(**{cfg!r}))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == -9, p.stderr
    parts = list((killed / "cohort/.score_parts").rglob("cluster_*.parquet"))
    assert len(parts) == 1 and not (killed / "cohort/cluster_metrics.parquet").exists()
    with RunFolder(killed) as run:
        assert run_score_stage(run, ScoreConfig(**cfg)).status == "done"
    pd.testing.assert_frame_equal(
        pd.read_parquet(clean / "cohort/cluster_metrics.parquet"),
        pd.read_parquet(killed / "cohort/cluster_metrics.parquet"),
    )
    assert not (killed / "cohort/.score_parts").exists()


def test_unknown_method_and_unclustered_run_are_clear_errors(audit_run, extracted, tmp_path):
    from wsi_explain.core.errors import WsiExplainError
    from wsi_explain.explain.card import ModelError

    d = copy_run(audit_run, tmp_path / "run")
    with RunFolder(d) as run, pytest.raises(ModelError, match="unknown method"):
        run_score_stage(run, ScoreConfig(methods=("nosuchcam",)))
    e = copy_run(extracted, tmp_path / "ext")
    with RunFolder(e) as run, pytest.raises(WsiExplainError, match="not clustered"):
        run_score_stage(run, ScoreConfig())


def test_cli_score_with_extra_models(audit_run, tmp_path):
    """`wsi-explain score` end to end, with --models giving the ensemble spread on the sample."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    run_dir = copy_run(audit_run, tmp_path / "run")
    ck = sorted(audit_run.parent.glob("model_*.pt"))
    cmd = [
        sys.executable,
        "-m",
        "wsi_explain.cli",
        "score",
        str(run_dir),
        "--methods",
        "gradcam",
        "--per-cluster",
        "4",
        "--groups",
        "faithfulness,ensemble,sanity,confounders",
        "--steps",
        "4",
        "--baselines",
        "constant",
        "--road-percentiles",
        "50",
        "--sanity-tiles",
        "2",
        "--references",
        "random",
        "--models",
        str(ck[1]),
        "--models",
        str(ck[2]),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=repo)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "deletion_auc_constant" in res.stdout and "randomisation sanity check: gradcam" in res.stdout
    out = " ".join(res.stdout.split())  # rich wraps long lines
    assert "gradcam: deletion_auc_constant" in out and "the random map (" in out
    assert "sampled metrics: started" in out and "(100 %)" in out  # progress lines in a non-interactive log
    assert "confounder scan (within label strata, intervals over slides):" in out
    tm = pd.read_parquet(run_dir / "cohort/tile_metrics.parquet")
    assert "random:deletion_auc_constant" in tm.columns and "uniform:deletion_auc_constant" not in tm.columns
    sampled = tm[tm.sampled]
    assert sampled["gradcam:attn_std"].notna().all() and (sampled["ensemble:prob_std"] > 0).all()
    cfg = json.loads((run_dir / "manifest.json").read_text())["config"]["score"]
    assert cfg["per_cluster"] == 4 and len(cfg["models"]) == 2 and cfg["references"] == ["random"]
    bad = subprocess.run(cmd[:5] + ["--groups", "vibes"], capture_output=True, text=True, cwd=repo)
    assert bad.returncode == 2 and "vibes" in bad.stderr


def test_chunking_of_the_sample_does_not_change_values(audit_run, tmp_path, monkeypatch):
    """Samples are scored in chunks (bounded memory); the values do not depend on the chunk."""
    from wsi_explain.stages.score_sample import SampleScorer

    out = []
    for chunk in (64, 8):
        monkeypatch.setattr(SampleScorer, "CHUNK", chunk)
        d = copy_run(audit_run, tmp_path / f"c{chunk}")
        with RunFolder(d) as run:
            run_score_stage(
                run,
                ScoreConfig(
                    **{**FAST, "per_cluster": 12, "groups": ("faithfulness", "robustness"), "methods": ("gradcam",)}
                ),
            )
        out.append(pd.read_parquet(d / "cohort/tile_metrics.parquet"))
    assert out[0]["sampled"].sum() > 8
    pd.testing.assert_frame_equal(out[0], out[1])


def test_bad_samples_are_scored_or_skipped_with_a_reason(audit_run, slides, tmp_path, monkeypatch):
    """Sampled tiles that no longer decode (the slide file damaged after extraction), a cluster of
    one tile and a method whose maps are all zero: every cluster is scored or skipped with a note
    in words (manifest, outcome, CLI), the stage finishes, and a rerun keeps the notes."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from wsi_explain.explain.attributors import ATTRIBUTORS, Attributor

    class Zeros(Attributor):
        name = "zeros"

        def __init__(self, model, *, name="zeros", target_layer=None, tile_px=None, **kw) -> None:
            super().__init__(model, **kw)

        def _attribute(self, x, targets):
            return torch.zeros(len(x), *x.shape[-2:])

    monkeypatch.setitem(ATTRIBUTORS, "zeros", lambda model, **kw: Zeros(model, **kw))
    d = copy_run(audit_run, tmp_path / "run")
    for sdir in (d / "slides").iterdir():  # the annotated slide now points at a copy whose middle tiles fail
        t = pq.read_table(sdir / "tiles.parquet")
        meta = json.loads(t.schema.metadata[b"wsi_explain"])
        if meta["slide_path"] == str(slides["tiff"]):
            meta["slide_path"] = str(slides["corrupt_middle"])
            md = {**t.schema.metadata, b"wsi_explain": json.dumps(meta).encode()}
            pq.write_table(t.replace_schema_metadata(md), sdir / "tiles.parquet")
    ct = pq.read_table(d / "cohort/tiles.parquet")
    df = ct.to_pandas()
    df.loc[df.index[0], "cluster"] = 7  # a cluster of one tile
    pq.write_table(
        pa.Table.from_pandas(df, preserve_index=False).replace_schema_metadata(ct.schema.metadata),
        d / "cohort/tiles.parquet",
    )
    cfg = ScoreConfig(
        **{**FAST, "per_cluster": 16, "methods": ("gradcam", "zeros"), "groups": ("faithfulness", "robustness")}
    )
    with RunFolder(d) as run:
        out = run_score_stage(run, cfg)
    assert out.status == "done"
    notes = " | ".join(out.notes)
    assert "sampled tiles could not be read and were left out (first: slide" in notes
    assert "cluster 7: a single tile scored: its values have no confidence interval" in notes
    assert "zeros maps are all zero on" in notes and "gradcam maps are all zero" not in notes
    recs = json.loads((d / "manifest.json").read_text())["stages"]["score"]["slides"].values()
    assert [r["sample_notes"] for r in recs] == [out.notes]
    tm = pd.read_parquet(d / "cohort/tile_metrics.parquet")
    assert (
        tm.loc[tm["cluster"] == 7, "sampled"].sum() == 1
        and tm.loc[tm["sampled"], "gradcam:deletion_auc_constant"].notna().all()
    )
    assert (tm.loc[tm["sampled"], "zeros:sensitivity"] == 0).all()  # captum: a map that never changes
    with RunFolder(d) as run:
        again = run_score_stage(run, cfg)
        from wsi_explain.stages.report import run_report_stage

        run_report_stage(run, thumb_px=32)
    assert again.status == "skipped" and again.notes == out.notes
    unread = next(n for n in out.notes if "could not be read" in n)
    page = (d / "report" / "clusters" / f"cluster_{unread.split(':')[0].split()[1]}.html").read_text()
    assert "About the scored sample" in page and "could not be read and were left out" in page
    index = (d / "report" / "index.html").read_text()
    assert "cluster 7: a single tile scored" in index and "zeros maps are all zero" in index


def test_integrated_gradients_takes_the_runs_steps_in_extraction_and_scoring(audit_run):
    """IG's steps, cap and tolerance are extraction settings: they reach the extraction's
    attributor as set, and the score stage's at a fixed step count (the cap, no refinement, no
    warnings: sensitivity and the sanity cascade compare maps of perturbed copies and randomised
    models); they enter the extraction's hash only when IG is extracted, and the score stage's
    hash when IG is scored."""
    from wsi_explain.core.config import ExtractConfig
    from wsi_explain.explain.extractors import method_options
    from wsi_explain.stages.score import score_params
    from wsi_explain.stages.score_sample import SampleScorer

    ig = "integratedgradients"
    raw = json.loads((audit_run / "manifest.json").read_text())["config"]["extract"]
    ecfg = ExtractConfig(**raw).model_copy(update={"ig_steps": 8, "ig_max_steps": 16, "ig_tolerance": 0.2})
    want = {"n_steps": 8, "max_steps": 16, "tolerance": 0.2}
    assert method_options(ecfg, ig) == {"attribute_kwargs": want} and method_options(ecfg, "saliency") == {}
    scorer = SampleScorer(audit_run, ScoreConfig(**FAST), ecfg, ("gradcam", ig), (), 32)
    assert scorer.explainers[ig].kwargs == {"n_steps": 16, "max_steps": 16, "tolerance": float("inf")}
    with_ig = ExtractConfig(methods=("gradcam", ig)).result_params()
    assert with_ig["ig_max_steps"] == 200 and "ig_steps" not in ExtractConfig().result_params()
    cfg = ScoreConfig(**FAST)
    other = ecfg.model_copy(update={"ig_max_steps": 32})
    assert score_params(cfg, ecfg, ("gradcam", ig)) != score_params(cfg, other, ("gradcam", ig))
    assert score_params(cfg, ecfg, ("gradcam",)) == score_params(cfg, other, ("gradcam",))
    # a cap below the first pass is allowed: no refinement
    fixed = method_options(ExtractConfig(ig_steps=64, ig_max_steps=32), ig, fixed=True)
    assert fixed["attribute_kwargs"]["n_steps"] == 64
