"""MIL heads over stored embeddings and the tile relevance of their slide decisions: the built-in
heads by their formulas, gradient x input and Integrated Gradients against captum on the same head,
leave-one-out against a direct recomputation, a planted decisive tile ranked first, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi_explain.explain.card import ModelError
from wsi_explain.explain.mil import ABMIL, MIL_HEADS, load_mil_head
from wsi_explain.explain.mil_relevance import (
    attention_relevance,
    gradient_x_input,
    integrated_gradients,
    leave_one_out,
)

D = 16


@pytest.fixture(scope="module")
def bag():
    return np.random.default_rng(0).normal(size=(40, D)).astype(np.float32)


@pytest.mark.parametrize("name", sorted(MIL_HEADS))
def test_heads_follow_their_formulas_and_check_the_bag(name, bag, tmp_path):
    m = load_mil_head(name, in_dim=D, n_classes=3)
    x = torch.from_numpy(bag)
    with torch.no_grad():
        logits = m(x)
        head = m.head
        h = head.fc(x)
        a = torch.tanh(head.attn_v(h))
        if head.attn_u is not None:
            a = a * torch.sigmoid(head.attn_u(h))
        s = head.attn_w(a)[:, 0]
        want = head.classifier(torch.softmax(s, 0) @ h)
    torch.testing.assert_close(logits, want)
    torch.testing.assert_close(m.attention, s)
    assert logits.shape == (3,)
    torch.save(head.state_dict(), tmp_path / "head.pt")
    again = load_mil_head(name, in_dim=D, n_classes=3, weights=tmp_path / "head.pt")
    torch.testing.assert_close(again(x), logits)
    with pytest.raises(ModelError, match=rf"a bag must be \(N, {D}\) embeddings, got \(40, 8\)"):
        m(x[:, :8])
    with pytest.raises(ModelError, match="an empty bag"):
        m(x[:0])
    with pytest.raises(ModelError, match="weights do not fit"):
        load_mil_head(name, in_dim=D + 1, n_classes=3, weights=tmp_path / "head.pt")


def test_unknown_and_entry_point_heads():
    with pytest.raises(ModelError, match="unknown MIL head 'transmil'"):
        load_mil_head("transmil", in_dim=D)
    m = load_mil_head("tests.tiny_models:mean_pool_head", in_dim=D, n_classes=2)
    assert m(torch.ones(5, D)).shape == (2,) and m.attention is None
    assert attention_relevance(m, np.ones((5, D), np.float32)) is None


@pytest.mark.parametrize("target", [0, 1])
def test_gradient_x_input_and_ig_equal_captum(bag, target):
    from captum.attr import InputXGradient, IntegratedGradients

    m = load_mil_head("gated_abmil", in_dim=D, n_classes=2)
    fwd = lambda inp: torch.stack([m(b) for b in inp])  # noqa: E731  (S, N, D) -> (S, K)
    x = torch.from_numpy(bag)[None]
    ref = InputXGradient(fwd).attribute(x, target=target)[0].sum(1).detach().numpy()
    np.testing.assert_allclose(gradient_x_input(m, bag, target=target), ref, rtol=1e-4, atol=1e-6)
    for baseline, b in (("zero", torch.zeros_like(x)), ("mean", x.mean(1, keepdim=True).expand_as(x))):
        ours, gap = integrated_gradients(m, bag, target=target, baseline=baseline, steps=32)
        ref = (
            IntegratedGradients(fwd)
            .attribute(x, baselines=b, target=target, n_steps=33, method="riemann_trapezoid")[0]
            .sum(1)
            .detach()
            .numpy()
        )
        # captum's trapezoid weights are 1/n per point (ends halved), summing to 1 - 1/n; ours are the
        # trapezoid rule's 1/(n-1), summing to 1 (completeness): equal up to that factor, 33/32
        np.testing.assert_allclose(ours, ref * 33 / 32, rtol=1e-4, atol=1e-6)
        assert gap < 0.05 * max(1.0, np.abs(ours).sum())  # completeness, up to the discretisation


def test_leave_one_out_equals_a_direct_recomputation_and_a_planted_tile_ranks_first():
    rng = np.random.default_rng(1)
    u = np.zeros(D, np.float32)
    u[3] = 1.0
    head = ABMIL(D, 2, attn_dim=4)
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()
        head.attn_v.weight[0] = torch.from_numpy(u)
        head.attn_w.weight[0, 0] = 3.0
        head.classifier.weight[0], head.classifier.weight[1] = -torch.from_numpy(u), torch.from_numpy(u)
    from wsi_explain.explain.mil import MilModel

    m = MilModel(head, in_dim=D, n_classes=2, name="planted")
    bag = rng.normal(scale=0.2, size=(60, D)).astype(np.float32)
    bag[:, 3] = rng.normal(scale=0.05, size=60)
    bag[17] = 2.0 * u  # the decisive tile
    before = bag.copy()
    rows, drops = leave_one_out(m, bag, target=1, sample=None)
    with torch.no_grad():
        full = float(m(torch.from_numpy(bag))[1])
        direct = [full - float(m(torch.from_numpy(np.delete(bag, i, 0)))[1]) for i in range(60)]
    np.testing.assert_allclose(drops, direct, rtol=1e-5, atol=1e-6)
    assert rows.tolist() == list(range(60)) and np.array_equal(bag, before)
    assert int(np.argmax(drops)) == 17
    assert int(np.argmax(gradient_x_input(m, bag, target=1))) == 17
    assert int(np.argmax(integrated_gradients(m, bag, target=1)[0])) == 17
    raw, soft = attention_relevance(m, bag)
    assert int(np.argmax(raw)) == 17 and soft.sum() == pytest.approx(1.0, abs=1e-5)
    sampled, _ = leave_one_out(m, bag, target=1, sample=10, seed=3)
    assert len(sampled) == 10 and np.array_equal(sampled, np.sort(sampled))
    assert np.array_equal(sampled, leave_one_out(m, bag, target=1, sample=10, seed=3)[0])  # seeded
    one_rows, one_drops = leave_one_out(m, bag[:1], target=1)  # a bag of one tile: nothing to leave out
    assert len(one_rows) == 0 and len(one_drops) == 0 and gradient_x_input(m, bag[:1], target=1).shape == (1,)
    with pytest.raises(ModelError, match="target class 2 out of range"):
        gradient_x_input(m, bag, target=2)


def test_mil_stage_on_the_audit_run(audit_run, tmp_path):
    """``wsi-explain mil`` on the audit run (2 labelled slides, 3 clusters, the tiny CNN's 64-wide
    embeddings) with an ABMIL head from a state dict: the mil/ groups, the slide, cluster and
    counterfactual tables; gradient x input and IG agree with leave-one-out on the real bags
    (Spearman > 0.9 per slide); bad input is a clear error."""
    import json
    import subprocess
    import sys

    import pandas as pd
    import zarr

    from tests.conftest import copy_run
    from wsi_explain import RunFolder
    from wsi_explain.stages.mil import _bags

    run = copy_run(audit_run, tmp_path / "run")
    with RunFolder(run) as rf:
        bags = _bags(rf)
    dim = next(iter(bags.values()))[0].shape[1]
    head = load_mil_head("abmil", in_dim=dim, n_classes=2)
    torch.save(head.head.state_dict(), tmp_path / "abmil.pt")
    cli = [sys.executable, "-m", "wsi_explain.cli", "mil", str(run)]
    args = ["--weights", str(tmp_path / "abmil.pt"), "--loo-sample", "16"]
    res = subprocess.run(cli + args, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    out = " ".join(res.stdout.split())
    assert "agreement with leave-one-out" in out and "cohort AUC of the head:" in out
    slides = pd.read_parquet(run / "cohort/mil_slides.parquet")
    assert len(slides) == 2 and slides["prob"].between(0, 1).all()
    assert {"spearman_attention", "spearman_grad_x_input", "spearman_integrated_gradients"} <= set(slides.columns)
    assert (slides["spearman_grad_x_input"] > 0.9).all() and (slides["spearman_integrated_gradients"] > 0.9).all()
    for sid, (emb, ok) in bags.items():
        g = zarr.open_group(str(run / "slides" / sid / "features.zarr"), mode="r")["mil"]
        loo = np.asarray(g["leave_one_out"][:])
        assert loo.shape == (len(emb),) and np.isfinite(loo).sum() == min(16, ok.sum())
        assert np.isnan(np.asarray(g["integrated_gradients"][:])[~ok]).all()
        assert np.asarray(g["attention"][:])[ok].sum() == pytest.approx(1.0, abs=1e-4)
    clusters = pd.read_parquet(run / "cohort/mil_clusters.parquet")
    tiles = pd.read_parquet(run / "cohort/tiles.parquet")
    assert set(clusters["cluster"]) == set(tiles["cluster"]) and clusters["mean_attention"].notna().all()
    cf = pd.read_parquet(run / "cohort/mil_counterfactuals.parquet")
    assert {"remove_cluster", "remove_top_relevant", "add_cluster_to_negative"} <= set(cf["kind"])
    summary = json.loads((run / "cohort/mil.json").read_text())
    stamp = (run / "cohort/mil_slides.parquet").stat().st_mtime_ns
    again = subprocess.run(cli + args, capture_output=True, text=True)  # a rerun is a no-op
    assert again.returncode == 0 and (run / "cohort/mil_slides.parquet").stat().st_mtime_ns == stamp
    assert 0.0 <= summary["auc_before"] <= 1.0 and set(summary["auc_without_cluster"]) <= {"0", "1", "2"}
    # bad input: a head of another width, an unknown head
    bad = subprocess.run(
        cli + ["--head", "tests.tiny_models:mean_pool_head", "--weights", str(tmp_path / "abmil.pt")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "weights do not fit" in " ".join(bad.stderr.split())
    bad = subprocess.run(cli + ["--head", "transmil"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown MIL head 'transmil'" in " ".join(bad.stderr.split())


def test_fit_mil_head_learns_a_planted_instance_and_is_seeded():
    """Positive bags hold a few tiles of a planted direction: the fitted ABMIL separates the bags
    and attends to the planted tiles; the same seed gives the same weights."""
    from wsi_explain.explain.mil import fit_mil_head

    rng = np.random.default_rng(0)
    plant = rng.normal(0, 1, 32).astype(np.float32)
    bags, labels = [], []
    for i in range(12):
        b = rng.normal(0, 1, (40, 32)).astype(np.float32)
        if i % 2:
            b[:3] += 3 * plant
        bags.append(b)
        labels.append(i % 2)
    m = fit_mil_head(bags, labels, epochs=30, seed=1)
    with torch.no_grad():
        p = [float(torch.softmax(m(torch.from_numpy(b)), 0)[1]) for b in bags]
        m(torch.from_numpy(bags[1]))
        att = m.attention.numpy()
    assert all(pi > 0.9 for pi in p[1::2]) and all(pi < 0.1 for pi in p[::2])
    assert set(np.argsort(-att)[:3]) == {0, 1, 2}  # the planted tiles get the most attention
    m2 = fit_mil_head(bags, labels, epochs=30, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    with pytest.raises(Exception, match="2 bags for 1 labels"):
        fit_mil_head(bags[:2], labels[:1])


def test_qwk_with_isup_grades_before_and_without_each_cluster(audit_run, tmp_path):
    """A 4-class head and ISUP grades in the cohort table: the summary's quadratic-weighted kappa is
    scikit-learn's on the slides' predicted classes, before and with each cluster removed; the
    per-tile table for the explorer has every clustered tile."""
    import json

    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.metrics import cohen_kappa_score

    from tests.conftest import copy_run
    from wsi_explain import RunFolder
    from wsi_explain.core.stage_configs import MilConfig
    from wsi_explain.stages.mil import run_mil_stage

    run = copy_run(audit_run, tmp_path / "run")
    src = run / "cohort/tiles.parquet"
    table = pq.read_table(src)
    tiles = table.to_pandas()
    sids = sorted(tiles.slide_id.unique())
    tiles["isup"] = tiles["slide_id"].map({sids[0]: 0, sids[1]: 3})
    pq.write_table(
        pa.Table.from_pandas(tiles, preserve_index=False).replace_schema_metadata(table.schema.metadata), src
    )
    with RunFolder(run) as rf:
        s = run_mil_stage(rf, MilConfig(head="abmil", n_classes=4, target=3, loo_sample=8))
    slides = pd.read_parquet(run / "cohort/mil_slides.parquet").set_index("slide_id")
    grades = pd.Series({sids[0]: 0, sids[1]: 3})
    want = cohen_kappa_score(grades[slides.index], slides["pred"], weights="quadratic")
    assert s["qwk_before"] == pytest.approx(want) and set(slides["pred"]) <= {0, 1, 2, 3}
    assert set(s["qwk_without_cluster"]) == {str(c) for c in tiles.cluster.unique() if c >= 0}
    assert json.loads((run / "cohort/mil.json").read_text())["qwk_before"] == pytest.approx(want)
    per_tile = pd.read_parquet(run / "cohort/mil_tiles.parquet")
    assert len(per_tile) == len(tiles) and per_tile["mil_ig"].notna().all()
    assert per_tile.groupby("slide_id")["mil_attention"].mean().to_numpy() == pytest.approx(1.0, abs=0.05)
