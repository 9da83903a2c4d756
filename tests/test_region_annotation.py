"""A segmentation model explained over the annotated area of each tile (issue 16: region targets
from annotation polygons or label masks, through the extraction and score stages)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import copy_run

SEG = dict(arch="tests.tiny_models:tiny_seg", num_classes=2, target_layer="net.encoder", workers=0, batch_size=64)


def test_annotation_regions_from_polygons_and_label_masks(tmp_path):
    import tiling
    from wsi_explain.io.regions import AnnotationRegions

    poly = [[[0, 0], [64, 0], [64, 32], [0, 32], [0, 0]]]  # the top half of the first 64 px tile
    feats = [
        {
            "type": "Feature",
            "properties": {"classification": {"name": n}},
            "geometry": {"type": "Polygon", "coordinates": c},
        }
        for n, c in (("Tumour", poly), ("Stroma", [[[64, 0], [128, 0], [128, 64], [64, 64], [64, 0]]]))
    ]
    (tmp_path / "a.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    tiles = pd.DataFrame({"x": [0, 64], "y": [0, 0], "size0": [64, 64], "tile_px": [16, 16]})
    meta = {"annotations": str(tmp_path / "a.geojson"), "slide_path": "s.tif"}
    both = AnnotationRegions(meta).masks(tiles, 16)
    assert both.shape == (2, 16, 16) and both[0, :8].all() and not both[0, 8:].any() and both[1].all()
    tum = AnnotationRegions(meta, ("tumour",)).masks(tiles, 16)  # matched case-insensitively
    assert tum[0].sum() == 128 and not tum[1].any()
    lab = np.zeros((64, 128), np.uint8)  # a label mask at 1/2 of a 128 x 128 slide: class 2 on the left half
    lab[:, :64] = 2
    from PIL import Image

    Image.fromarray(lab).save(tmp_path / "m.png")
    mm = {"label_mask": str(tmp_path / "m.png"), "label_classes": {"2": "gleason4"}, "level0_dimensions": [128, 128]}
    got = AnnotationRegions(mm, ("Gleason4",)).masks(tiles, 16)
    assert got[0].all() and not got[1].any()
    with pytest.raises(tiling.AnnotationError, match="s.tif.*needs the slide's annotations"):
        AnnotationRegions({"slide_path": "s.tif"})


@pytest.fixture(scope="module")
def seg_run(audit_run, tmp_path_factory):
    """The audit run (slide 1 with a Tumour polygon, slide 2 without annotations) re-extracted with
    a toy segmentation net explained over the annotated area."""
    from wsi_explain import RunFolder
    from wsi_explain.core.config import ExtractConfig
    from wsi_explain.stages.extract import run_extract_stage

    run_dir = copy_run(audit_run, tmp_path_factory.mktemp("segrun") / "run")
    cfg = ExtractConfig(**SEG, methods=("gradcam", "hirescam", "saliency"), region="annotation", attr_sample=0)
    with RunFolder(run_dir) as run:
        res = {r.slide_id: r for r in run_extract_stage(run, cfg)}
    return run_dir, cfg, res


def test_extraction_explains_the_annotated_area(seg_run):
    from wsi_explain.explain.extractors import build_extractors
    from wsi_explain.io.features import open_store
    from wsi_explain.io.loader import TileDataset
    from wsi_explain.io.regions import AnnotationRegions
    from wsi_explain.io.tile_table import read_tile_table

    run_dir, cfg, res = seg_run
    done = [s for s, r in res.items() if r.status == "done"]
    failed = [r for r in res.values() if r.status == "failed"]
    # the slide without annotations is refused by name; the annotated one finishes
    assert len(done) == 1 and len(failed) == 1 and "needs the slide's annotations" in failed[0].error
    sdir = run_dir / "slides" / done[0]
    tiles, meta = read_tile_table(sdir / "tiles.parquet")
    g = open_store(sdir / "features.zarr")
    assert g.attrs["task"] == "segmentation" and g.attrs["region"] == "mask"
    regions = AnnotationRegions(meta)
    inside = regions.masks(tiles, 32).mean((1, 2))
    cam = np.asarray(g["cams/gradcam"][:], np.float32) * np.asarray(g["cams_scale/gradcam"][:])[:, None, None]
    assert (inside == 0).sum() > 10 and (inside == 1).sum() > 10
    assert np.all(cam[inside == 0] == 0)  # no annotated pixel: an empty region, nothing explained
    assert cam[inside == 1].max() > 0
    # the stored maps equal the fused pass with the masks given explicitly
    ids = np.flatnonzero((inside > 0) & (inside < 1))[:4].tolist() + np.flatnonzero(inside == 1)[:4].tolist()
    ds = TileDataset(meta["slide_path"], tiles, mpp=meta.get("level0_mpp"))
    [fx] = build_extractors(cfg.model_copy(update={"device": "cpu", "amp": False}), 32)
    with fx:
        out = fx.forward(
            fx.normalise(np.stack([ds[i][1].numpy() for i in ids])),
            targets=np.asarray(g["targets"][:])[ids],
            masks=torch.from_numpy(regions.masks(tiles.iloc[ids], 32)),
        )
    scale = np.maximum(out.cams["hirescam"].max((1, 2)), 1e-12)[:, None, None]
    stored = np.asarray(g["cams/hirescam"][:], np.float32)[ids]
    np.testing.assert_allclose(stored, out.cams["hirescam"] / scale, atol=2e-3)  # float16 storage
    # saliency (captum) explains the same region: nothing outside the annotations
    sal_ids = np.asarray(g["attributions/saliency/tile_ids"][:])
    sal = np.asarray(g["attributions/saliency/maps"][:]).reshape(len(sal_ids), -1).sum(1)
    assert np.all(sal[inside[sal_ids] == 0] == 0) and np.all(sal[inside[sal_ids] > 0.5] > 0)


def test_score_stage_keeps_the_annotated_region(seg_run):
    from wsi_explain import RunFolder
    from wsi_explain.core.config import ClusterConfig, ScoreConfig
    from wsi_explain.stages.cluster import run_cluster_stage
    from wsi_explain.stages.score import run_score_stage

    run_dir, _, _ = seg_run
    cfg = ScoreConfig(
        per_cluster=6,
        steps=4,
        baselines=("blur",),
        road_percentiles=(50,),
        references=("random",),
        infidelity_samples=2,
        sensitivity_samples=2,
        sanity_tiles=2,
        n_boot=50,
    )
    with RunFolder(run_dir) as run:
        run_cluster_stage(run, ClusterConfig(method="kmeans", k=2, pca=8, positive_labels=("Tumour",)))
        out = run_score_stage(run, cfg)
    assert out.status == "done" and out.n_sampled > 0
    tm = pd.read_parquet(run_dir / "cohort" / "tile_metrics.parquet")
    s = tm.loc[tm["sampled"], ["gradcam:sensitivity", "hirescam:sensitivity", "gradcam:deletion_auc_blur"]]
    assert np.isfinite(s.to_numpy()).any(axis=0).all()


def test_score_stage_reads_the_metrics_over_the_annotated_region(seg_run):
    """The score stage's faithfulness metrics read each tile's target probability over its
    annotated region (the region the maps explain), fixed from the unperturbed tile: the stage's
    values equal the metric functions called with those regions, and differ from the whole tile's
    reading on tiles the annotation covers in part."""
    import wsi_explain.metrics as M
    from wsi_explain.core.config import ScoreConfig
    from wsi_explain.io.regions import AnnotationRegions
    from wsi_explain.io.tile_table import read_tile_table
    from wsi_explain.metrics._common import target_probs
    from wsi_explain.stages.score_sample import SampleScorer

    run_dir, ecfg, res = seg_run
    sid = next(s for s, r in res.items() if r.status == "done")
    tiles, meta = read_tile_table(run_dir / "slides" / sid / "tiles.parquet")
    inside = AnnotationRegions(meta).masks(tiles, 32).mean((1, 2))
    part = np.flatnonzero((inside > 0.1) & (inside < 0.9))[:6]
    assert len(part) >= 3
    sample = tiles.iloc[part][["tile_id"]].assign(slide_id=sid).reset_index(drop=True)
    cfg = ScoreConfig(steps=4, baselines=("blur",), road_percentiles=(50,), infidelity_samples=2, references=())
    scorer = SampleScorer(run_dir, cfg, ecfg, ("gradcam",), ("Tumour",), 32)
    x, t, ok = scorer.reader.images(sample)
    assert ok.all()
    mk = scorer.reader.target_masks(sample, 32, ecfg.region_labels)
    sh = scorer._shared(x, t, mk)
    regions = sh["regions"]
    assert torch.equal(regions, torch.as_tensor(mk).float())
    assert np.allclose(sh["clean"], target_probs(scorer.model, x, torch.as_tensor(t), regions=regions), atol=1e-6)
    assert not np.allclose(
        sh["clean"], target_probs(scorer.model, x, torch.as_tensor(t)), atol=1e-4
    )  # not the whole tile
    maps = M.reference_maps("random", len(x), (32, 32), seed=0)
    cols = scorer._faithfulness("random", x, maps, t, 0, sh)
    kw = dict(targets=t, regions=regions)
    curve = M.perturbation_curve(scorer.model, x, maps, baseline=sh["baseline"]["blur"], steps=4, **kw)
    assert np.allclose(cols[("random", "deletion_auc_blur")], M.curve_auc(curve), atol=1e-6)
    whole = M.perturbation_curve(scorer.model, x, maps, baseline=sh["baseline"]["blur"], steps=4, targets=t)
    assert not np.allclose(cols[("random", "deletion_auc_blur")], M.curve_auc(whole), atol=1e-4)  # not the tile
    dic = M.confidence_change(scorer.model, x, maps, how="mask", threshold=cfg.mask_threshold, fill=scorer.black, **kw)
    assert np.allclose(cols[("random", "dic_mask")], dic["drop"], atol=1e-6)
    road = M.road(scorer.model, x, maps, percentiles=(50,), seed=cfg.seed, **kw)
    assert np.allclose(cols[("random", "road_combined")], road["combined"], atol=1e-6)
    inf = M.infidelity_score(
        scorer.model,
        x,
        maps,
        noise_std=cfg.infidelity_noise,
        n_samples=2,
        seed=cfg.seed,
        max_examples_per_batch=max(cfg.batch_size, 2),
        **kw,
    )
    assert np.allclose(cols[("random", "infidelity")], inf, rtol=1e-5, atol=1e-8)


def test_stored_maps_are_listed_and_read_by_tile_id(tmp_path):
    """``stored_methods`` lists CAMs then attributions; ``read_maps`` returns CAMs for every tile
    (times their stored scale) and attributions for the sampled tiles only, in the asked order
    (a repeated id in the store: its first map); an unknown method is a KeyError."""
    import zarr

    from wsi_explain.io.features import add_attributions, open_store, read_maps, stored_methods

    g = zarr.open_group(str(tmp_path / "f.zarr"), mode="w")
    cams = np.arange(5 * 2 * 2, dtype=np.float32).reshape(5, 2, 2)
    g.create_array("cams/gradcam", data=cams.astype(np.float16))
    g.create_array("cams_scale/gradcam", data=np.full(5, 2.0, np.float32))
    maps = np.arange(3 * 4 * 4, dtype=np.float32).reshape(3, 4, 4)
    add_attributions(tmp_path / "f.zarr", "saliency", np.array([4, 1, 4]), maps)
    g = open_store(tmp_path / "f.zarr")
    assert stored_methods(g) == ["gradcam", "saliency"]
    have, got = read_maps(g, "gradcam", np.array([3, 0]))
    assert have.all() and np.array_equal(got, 2 * cams[[3, 0]])
    have, got = read_maps(g, "saliency", np.array([0, 4, 1, 2]))
    assert have.tolist() == [False, True, True, False] and np.array_equal(got, maps[[0, 1]])
    with pytest.raises(KeyError, match="nope"):
        read_maps(g, "nope", np.array([0]))
