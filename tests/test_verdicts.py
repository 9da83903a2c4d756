"""Cluster verdicts: saved with history, backward compatible, exported, imported and compared
between two readers, and their effect on the slide scores (the clusters marked as artefacts
removed together)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from tests.conftest import copy_run
from wsi_explain.core.errors import WsiExplainError
from wsi_explain.metrics.removal import group_removal, slide_labels, slide_scores
from wsi_explain.report.names import read_cluster_names, save_cluster_name
from wsi_explain.report.verdicts import compare_verdicts, effect_sentence, export_verdicts, import_verdicts
from wsi_explain.stages.report import verdict_effect


def test_verdicts_save_with_history_and_old_files_still_read(tmp_path):
    (tmp_path / "cohort").mkdir()
    old = {"version": 2, "names": {"1": "glands"}, "comments": {}, "history": []}  # written before verdicts
    (tmp_path / "cohort/cluster_names.json").write_text(json.dumps(old))
    assert read_cluster_names(tmp_path)["verdicts"] == {}
    doc = save_cluster_name(tmp_path, 3, "blue marker", verdict="pen ink", author="dr a")
    assert doc["verdicts"] == {"3": "pen ink"} and doc["names"]["1"] == "glands" and doc["version"] == 3
    doc = save_cluster_name(tmp_path, 3, "blue marker", "checked")  # no verdict given: kept
    assert doc["verdicts"] == {"3": "pen ink"} and doc["comments"]["3"] == "checked"
    doc = save_cluster_name(tmp_path, 3, "blue marker", verdict="")  # "" removes it
    assert doc["verdicts"] == {} and [h["verdict"] for h in doc["history"]] == ["pen ink", "pen ink", ""]
    with pytest.raises(WsiExplainError, match="unknown verdict 'ink'"):
        save_cluster_name(tmp_path, 3, "x", verdict="ink")
    bad = {**read_cluster_names(tmp_path), "verdicts": {"3": "maybe"}}
    (tmp_path / "cohort/cluster_names.json").write_text(json.dumps(bad))
    with pytest.raises(WsiExplainError, match="cluster_names.json: unknown verdict"):
        read_cluster_names(tmp_path)


def test_export_import_round_trip_and_bad_files(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    save_cluster_name(a, 0, "stroma", verdict="biology")
    save_cluster_name(a, 2, "ink <b>", "blue", verdict="pen ink")
    f = export_verdicts(a, tmp_path / "out/verdicts.json")
    save_cluster_name(b, 2, "something else", verdict="unsure")
    before = (b / "cohort/cluster_names.json").read_text()
    with pytest.raises(WsiExplainError, match=r"verdicts.json: cluster\(s\) \[2\] are not clusters of b"):
        import_verdicts(b, f, clusters=[0, 1])
    assert (b / "cohort/cluster_names.json").read_text() == before  # nothing written
    doc = import_verdicts(b, f, clusters=[0, 1, 2])
    assert doc["verdicts"] == {"0": "biology", "2": "pen ink"} and doc["names"]["2"] == "ink <b>"
    assert doc["comments"]["2"] == "blue" and doc["history"][-1]["author"] == "import:verdicts.json"
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(WsiExplainError, match="junk.json: not a readable JSON file"):
        import_verdicts(b, tmp_path / "junk.json")
    (tmp_path / "other.json").write_text(json.dumps({"names": {}}))
    with pytest.raises(WsiExplainError, match="other.json: not a verdicts file"):
        import_verdicts(b, tmp_path / "other.json")
    wrong = json.loads(f.read_text())
    wrong["clusters"]["2"]["verdict"] = "smudge"
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    with pytest.raises(WsiExplainError, match="wrong.json: cluster 2 has an unknown verdict 'smudge'"):
        import_verdicts(b, tmp_path / "wrong.json")


def test_compare_verdicts_agreement_and_kappa_by_hand():
    a = {0: "pen ink", 1: "biology", 2: "blur", 3: "biology"}
    b = {"0": "pen ink", "1": "biology", "2": "biology", "4": "blur", "5": ""}
    table, s = compare_verdicts(a, b)
    assert table["cluster"].tolist() == [0, 1, 2, 3, 4]
    assert s["n_both"] == 3 and s["agreement"] == pytest.approx(2 / 3)
    # p_o = 2/3; p_e = 1/3 * 1/3 (pen ink) + 1/3 * 2/3 (biology) + 0 (blur) = 1/3; kappa = 0.5
    assert s["kappa"] == pytest.approx(0.5)
    assert table.set_index("cluster")["agree"].tolist()[:3] == [True, True, False]
    assert np.isnan(compare_verdicts({0: "blur"}, {0: "blur"})[1]["kappa"])  # one cluster: undefined


def test_group_removal_equals_a_direct_recomputation():
    rng = np.random.default_rng(0)
    tiles = pd.DataFrame(
        {
            "slide_id": np.repeat(["a", "b", "c", "d"], 30),
            "cluster": rng.integers(0, 4, 120),
            "prob_pos": rng.random(120),
            "label": np.repeat([1, 0, 1, 0], 30),
        }
    )
    tiles.loc[tiles["slide_id"] == "d", "cluster"] = 3  # slide d holds cluster 3 only
    before = tiles.copy()
    per_slide, s = group_removal(tiles, [3, 1], slide_labels=slide_labels(tiles), topk=5)
    pd.testing.assert_frame_equal(tiles, before)
    keep = tiles[~tiles["cluster"].isin([1, 3])]
    direct = slide_scores(keep, topk=5)
    got = per_slide.set_index("slide_id")
    for sid in ("a", "b", "c"):
        assert got.at[sid, "topk_after"] == pytest.approx(direct.at[sid, "topk"])
        assert got.at[sid, "n_removed"] == int(tiles[(tiles.slide_id == sid) & tiles.cluster.isin([1, 3])].shape[0])
    assert got.at["d", "n_left"] == 0 and np.isnan(got.at["d", "topk_after"]) and s["n_emptied"] == 1
    assert s["clusters"] == [1, 3] and s["n_tiles"] == int(tiles.cluster.isin([1, 3]).sum())
    from sklearn.metrics import roc_auc_score

    assert s["auc_topk_before"] == pytest.approx(roc_auc_score([1, 0, 1, 0], slide_scores(tiles, topk=5)["topk"]))
    assert s["auc_topk_after"] == pytest.approx(roc_auc_score([1, 0, 1], direct["topk"]))
    nothing, s0 = group_removal(tiles, [], slide_labels=None)
    assert nothing.empty and s0["n_tiles"] == 0 and "auc_topk_before" not in s0


def test_verdict_effect_in_words_and_through_the_cli(audit_run, tmp_path):
    run = copy_run(audit_run, tmp_path / "run")
    assert verdict_effect(run) is None  # no verdict yet
    save_cluster_name(run, 1, "dark <smudge>", verdict="biology")
    assert verdict_effect(run) is None  # biology is no artefact
    save_cluster_name(run, 2, "marker", verdict="pen ink")
    e = verdict_effect(run)
    assert e["clusters"] == {2: "pen ink"} and e["n_tiles"] > 0 and "auc_topk_before" in e
    text = effect_sentence(e, {2: "marker"})
    assert text.startswith("Removing the clusters marked as artefacts (marker (pen ink);")
    assert "moves the cohort AUC (top-8 score) from" in text
    cli = [sys.executable, "-m", "wsi_explain.cli", "verdicts", str(run)]
    res = subprocess.run(cli + ["--export", str(tmp_path / "mine.json")], capture_output=True, text=True)
    out = " ".join(res.stdout.split())
    assert res.returncode == 0 and "wrote" in out and "pen ink" in out and "Removing the clusters" in out
    theirs = json.loads((tmp_path / "mine.json").read_text())
    theirs["clusters"]["2"]["verdict"] = "blur"
    (tmp_path / "theirs.json").write_text(json.dumps(theirs))
    res = subprocess.run(cli + ["--compare", str(tmp_path / "theirs.json")], capture_output=True, text=True)
    out = " ".join(res.stdout.split())
    assert res.returncode == 0 and "2 clusters judged by both: agreement 50%" in out and "NO" in out
    theirs["clusters"]["9"] = {"verdict": "blur"}
    (tmp_path / "bad.json").write_text(json.dumps(theirs))
    res = subprocess.run(cli + ["--import", str(tmp_path / "bad.json")], capture_output=True, text=True)
    assert res.returncode == 2 and "bad.json" in res.stderr and "[9] are not clusters" in " ".join(res.stderr.split())
    res = subprocess.run(cli + ["--import", str(tmp_path / "theirs.json")], capture_output=True, text=True)
    assert res.returncode == 0 and read_cluster_names(run)["verdicts"]["2"] == "blur"
    # the exports carry the verdicts
    from wsi_explain import RunFolder
    from wsi_explain.report.export import export_run

    with RunFolder(run) as rf:
        export_run(rf)
    csv = pd.read_csv(run / "exports/cohort_tiles.csv", keep_default_na=False)
    assert set(csv.loc[csv.cluster == 2, "cluster_verdict"]) == {"blur"}
    assert set(csv.loc[csv.cluster == 0, "cluster_verdict"]) == {""}
    sid = csv.loc[csv.cluster == 2, "slide_id"].iloc[0]
    gj = json.loads((run / "exports" / f"{sid}.geojson").read_text())
    assert {f["properties"]["cluster_verdict"] for f in gj["features"] if f["properties"]["cluster"] == 2} == {"blur"}
