"""The expensive metrics of one cluster's sample of tiles, re-read from the slides.

:class:`SampleScorer` holds what every cluster shares (the model, the explainers, the slides'
tile tables and annotations) and :meth:`SampleScorer.score` turns a sample into per-tile values
(long format: slide_id, tile_id, cluster, method, metric, value) plus the randomisation curve.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from wsi_explain import metrics as M
from wsi_explain.core.config import ExtractConfig, ScoreConfig
from wsi_explain.explain.maps import minmax_maps

__all__ = ["SampleScorer", "sample_clusters", "grades_for"]

logger = logging.getLogger(__name__)


def sample_clusters(tiles: pd.DataFrame, *, per_cluster: int, seed: int, include_noise: bool = True) -> dict[int, pd.DataFrame]:
    """A sample of at most ``per_cluster`` tiles per cluster, balanced over the cluster's slides
    (slides in random order, each contributing in turn). Rows keep slide_id, tile_id, cluster."""
    rng = np.random.default_rng(seed)
    out = {}
    for c in sorted(tiles["cluster"].unique()):
        if c < 0 and not include_noise:
            continue
        sub = tiles[tiles["cluster"] == c]
        groups = [g.iloc[rng.permutation(len(g))] for _, g in sub.groupby("slide_id", sort=True)]
        groups = [groups[i] for i in rng.permutation(len(groups))]
        picked, depth = [], 0
        while len(picked) < min(per_cluster, len(sub)):
            for g in groups:
                if depth < len(g) and len(picked) < per_cluster:
                    picked.append(g.iloc[depth])
            depth += 1
        keep = [k for k in ("slide_id", "tile_id", "cluster", "label_pos") if k in sub.columns]
        out[int(c)] = pd.DataFrame(picked)[keep].reset_index(drop=True)
    return out


def grades_for(classes: list[str], positive: tuple[str, ...], grades: dict[str, float] | None) -> dict[str, float]:
    """Graded-hit score of each annotation class: explicit ``grades`` (matched case-insensitively),
    else positive labels in order 3, 2, 1 (then 1) and the other classes 0."""
    from tiling import label_column

    if grades:
        g = {label_column(k): float(v) for k, v in grades.items()}
        return {c: g.get(label_column(c), 0.0) for c in classes}
    pos = [label_column(p) for p in positive]
    return {c: float(max(3 - pos.index(label_column(c)), 1)) if label_column(c) in pos else 0.0 for c in classes}


@dataclass
class _SlideInfo:
    tiles: pd.DataFrame
    meta: dict
    targets: np.ndarray
    dataset: object  # TileDataset: one slide handle per slide, reused for every sampled tile
    ann: object = None
    mask: np.ndarray | None = None
    classes: dict = field(default_factory=dict)


class SampleScorer:
    """Score samples of tiles with every method and metric family of a :class:`ScoreConfig`.

    Parameters
    ----------
    run_path : Path
    cfg : ScoreConfig
    ecfg : ExtractConfig (the run's extraction, for the model and the methods)
    methods : methods to score
    positive_labels : annotation classes counted as positive (localisation region, grades)
    """

    def __init__(self, run_path: Path, cfg: ScoreConfig, ecfg: ExtractConfig, methods: tuple[str, ...],
                 positive_labels: tuple[str, ...], tile_px: int) -> None:
        from wsi_explain.explain.attributors import make_explainer
        from wsi_explain.explain.extractors import build_extractors

        self.run_path, self.cfg, self.methods, self.positive = run_path, cfg, methods, positive_labels
        self.tile_px = tile_px
        ecfg = ecfg.model_copy(update={"ensemble": (), "device": cfg.device, "amp": False})
        self.fx = build_extractors(ecfg, tile_px)[0]
        self.model = self.fx.module
        self.ecfg = ecfg
        card = self.fx.model.card
        self.black = tuple(-m / s for m, s in zip(card.mean, card.std))
        opts = dict(target_layer=self.fx.target_layer, tile_px=tile_px, max_batch=ecfg.attr_max_batch, device=cfg.device)
        self._opts = opts
        self.explainers = {m: make_explainer(m, self.fx.model, **opts) for m in methods}
        self._extra = None
        self._slides: dict[str, _SlideInfo] = {}

    # -- inputs ----------------------------------------------------------------------------
    def _slide(self, sid: str) -> _SlideInfo:
        if sid not in self._slides:
            from wsi_explain.io.features import open_store
            from wsi_explain.io.tile_table import read_tile_table

            sdir = self.run_path / "slides" / sid
            tiles, meta = read_tile_table(sdir / "tiles.parquet")
            targets = np.asarray(open_store(sdir / "features.zarr")["targets"][:], np.int64)
            from wsi_explain.io.loader import TileDataset

            ds = TileDataset(meta["slide_path"], tiles, mpp=meta.get("level0_mpp"))
            info = _SlideInfo(tiles, meta, targets, ds)
            self._load_annotations(info)
            self._slides[sid] = info
        return self._slides[sid]

    def _load_annotations(self, info: _SlideInfo) -> None:
        import tiling

        try:
            if info.meta.get("annotations"):
                info.ann = tiling.read_geojson(info.meta["annotations"])
            elif info.meta.get("label_mask"):
                info.mask = tiling.read_label_mask(info.meta["label_mask"])
                names = info.meta.get("label_classes") or {}
                info.classes = {int(i): names.get(str(int(i)), f"class_{int(i)}") for i in np.unique(info.mask)}
        except (tiling.AnnotationError, OSError) as exc:  # scored without localisation, and said so
            logger.warning("slide %s: annotations unusable for localisation (%s)", info.meta.get("slide_id"), exc)
            info.ann, info.mask = None, None

    def _images(self, sample: pd.DataFrame) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """Normalised inputs (N, 3, px, px) on the CPU, targets (N,), and an ok flag per tile."""
        imgs, tg, ok = [], [], []
        for sid, tid in zip(sample["slide_id"], sample["tile_id"]):
            info = self._slide(sid)
            _, img, good, err = info.dataset[int(tid)]
            if not good:
                logger.warning("slide %s tile %d: %s (left out of the metrics)", sid, tid, err)
            imgs.append(np.asarray(img))
            tg.append(info.targets[int(tid)])
            ok.append(bool(good))
        x = self.fx.normalise(np.stack(imgs)).float().cpu().contiguous()
        return x, np.asarray(tg, np.int64), np.asarray(ok)

    def _regions(self, sample: pd.DataFrame, px: int):
        """(N, px, px) bool region of interest and int grade codes + their grades, or None."""
        import tiling

        region = np.zeros((len(sample), px, px), bool)
        codes = np.zeros((len(sample), px, px), np.int32)
        grade_of: dict[int, float] = {0: -1.0}
        names: dict[str, int] = {}
        any_ann = False
        for sid, idx in sample.groupby("slide_id").indices.items():
            info = self._slide(sid)
            rows = info.tiles.iloc[sample["tile_id"].to_numpy()[idx].astype(int)]
            if info.ann is not None:
                masks = tiling.geojson_tile_masks(rows, info.ann, px=px)
            elif info.mask is not None:
                lab = tiling.mask_tile_labels(rows, info.mask, slide_dimensions=tuple(info.meta["level0_dimensions"]), px=px)
                masks = {name: lab == i for i, name in info.classes.items() if i != 0}
            else:
                continue
            any_ann = True
            grades = grades_for(list(masks), self.positive, self.cfg.grades)
            pos = {tiling.label_column(p) for p in self.positive}
            best = np.full((len(idx), px, px), -np.inf)
            for name, mk in masks.items():
                if not pos or tiling.label_column(name) in pos:
                    region[idx] |= mk
                code = names.setdefault(name, len(names) + 1)
                grade_of[code] = grades[name]
                better = mk & (grades[name] > best)
                codes[idx] = np.where(better, code, codes[idx])
                best = np.where(better, grades[name], best)
        return (region, codes, grade_of) if any_ann else None

    # -- the metrics -------------------------------------------------------------------------
    #: tiles scored together: memory stays bounded whatever ``per_cluster`` (a multiple of the
    #: metrics' seeded chunk, so the values do not depend on it)
    CHUNK = 64

    def score(self, cluster: int, sample: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Per-tile values of every method and metric for one cluster's sample, in chunks of
        :attr:`CHUNK` tiles re-read from the slides.

        Returns
        -------
        values : long DataFrame (slide_id, tile_id, cluster, method, metric, value)
        sanity : DataFrame (cluster, method, step, block, spearman, ssim, n) of the cascade (on the
            first ``sanity_tiles`` tiles)
        """
        vals, san = [], []
        for s0 in range(0, len(sample), self.CHUNK):
            v, sn = self._score_chunk(cluster, sample.iloc[s0 : s0 + self.CHUNK].reset_index(drop=True), s0)
            vals.append(v)
            san.append(sn)
        values = pd.concat([v for v in vals if len(v)], ignore_index=True) if any(len(v) for v in vals) else vals[0]
        return values, (pd.concat(san, ignore_index=True) if san else pd.DataFrame())

    def _score_chunk(self, cluster: int, sample: pd.DataFrame, offset: int) -> tuple[pd.DataFrame, pd.DataFrame]:
        cfg, groups = self.cfg, set(self.cfg.groups)
        seed = cfg.seed + offset
        x, t, ok = self._images(sample)
        sample, x, t = sample[ok].reset_index(drop=True), x[torch.from_numpy(ok)], t[ok]
        cols: dict[tuple[str, str], np.ndarray] = {}
        sanity_rows = []
        if len(sample) == 0:
            return pd.DataFrame(columns=["slide_id", "tile_id", "cluster", "method", "metric", "value"]), pd.DataFrame()
        regions = self._regions(sample, x.shape[-1]) if "localisation" in groups else None
        bs = cfg.batch_size
        for m, ex in self.explainers.items():
            maps = ex.attribute(x, targets=t)
            if "faithfulness" in groups:
                for base in cfg.baselines:
                    for mode in ("deletion", "insertion"):
                        c = M.perturbation_curve(self.model, x, maps, targets=t, mode=mode, baseline=base, steps=cfg.steps, batch_size=bs)
                        cols[(m, f"{mode}_auc_{base}")] = M.curve_auc(c)
                for how in ("multiply", "mask"):
                    cc = M.confidence_change(self.model, x, maps, targets=t, how=how, threshold=cfg.mask_threshold,
                                             fill=self.black, batch_size=bs)
                    cols[(m, f"dic_{how}")], cols[(m, f"iic_{how}")] = cc["drop"], cc["increase"]
                k = len(x) if cfg.road_tiles == 0 else max(0, min(len(x), cfg.road_tiles - offset))
                if k:
                    r = M.road(self.model, x[:k], maps[:k], targets=t[:k], percentiles=cfg.road_percentiles, seed=seed)
                    for name in ("morf", "lerf", "combined"):
                        col = np.full(len(x), np.nan, np.float32)
                        col[:k] = r[name]
                        cols[(m, f"road_{name}")] = col
                cols[(m, "infidelity")] = M.infidelity_score(self.model, x, maps, targets=t, noise_std=cfg.infidelity_noise,
                                                             n_samples=cfg.infidelity_samples, seed=seed,
                                                             max_examples_per_batch=max(bs, cfg.infidelity_samples))
            if "robustness" in groups:
                cols[(m, "sensitivity")] = M.sensitivity(lambda z, target=None, _ex=ex: _ex.attribute(z, targets=target), x,
                                                         targets=t, radius=cfg.sensitivity_radius,
                                                         n_samples=cfg.sensitivity_samples, seed=seed,
                                                         max_examples_per_batch=max(bs, cfg.sensitivity_samples))
            if regions is not None:
                region, codes, grade_of = regions
                cols[(m, "pointing_game")] = M.pointing_game(maps, region)
                cols[(m, "graded_hit")] = M.graded_hit(maps, codes, grades=grade_of)
                cols[(m, "relevance_mass")] = M.relevance_mass(maps, region)
                cols[(m, "relevance_rank")] = M.relevance_rank(maps, region)
                io = M.iou_coverage(maps, region, threshold=cfg.mask_threshold)
                cols[(m, "iou")], cols[(m, "coverage")] = io["iou"], io["coverage"]
            if "sanity" in groups and cfg.sanity_tiles > 0 and offset == 0:
                k = min(cfg.sanity_tiles, len(x))
                steps = M.cascading_randomisation(self.model, self._sanity_explain(m), x[:k], targets=t[:k], seed=cfg.seed)
                for st in steps:
                    sanity_rows.append({"cluster": cluster, "method": m, "step": st["step"], "block": st["block"],
                                        "spearman": float(np.nanmean(st["spearman"])), "ssim": float(np.nanmean(st["ssim"])), "n": k})
                full_sp = np.full(len(x), np.nan, np.float32)
                full_ss = np.full(len(x), np.nan, np.float32)
                full_sp[:k], full_ss[:k] = steps[-1]["spearman"], steps[-1]["ssim"]
                cols[(m, "sanity_spearman")], cols[(m, "sanity_ssim")] = full_sp, full_ss
        if "ensemble" in groups and self.cfg.models:
            labels = sample["label_pos"].to_numpy(np.float64) if "label_pos" in sample.columns else None
            cols.update(self._ensemble(x, t, labels))
        rows = [pd.DataFrame({"slide_id": sample["slide_id"], "tile_id": sample["tile_id"].astype(np.int64), "cluster": cluster,
                              "method": m, "metric": k, "value": v.astype(np.float64)}) for (m, k), v in cols.items()]
        values = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(
            columns=["slide_id", "tile_id", "cluster", "method", "metric", "value"])
        return values, pd.DataFrame(sanity_rows)

    def _sanity_explain(self, method: str):
        from wsi_explain.explain.attributors import make_explainer

        def explain(module, z, targets):
            return make_explainer(method, module, **self._opts).attribute(z, targets=targets)

        return explain

    def _ensemble(self, x: torch.Tensor, t: np.ndarray, labels: np.ndarray | None) -> dict:
        """Spread of the run's model and the ``--models`` checkpoints on the sample."""
        from wsi_explain.explain.extractors import build_extractors
        from wsi_explain.explain.fused import FusedExtractor

        if self._extra is None:
            self._extra = [build_extractors(self.ecfg.model_copy(update={"weights": w}), self.tile_px)[0] for w in self.cfg.models]
        fused = [m for m in self.fx.methods]
        probs, cams = [], {m: [] for m in fused}
        for fx in [self.fx] + self._extra:
            f = FusedExtractor(fx.model, methods=tuple(fused), target_layer=fx.target_layer, device=self.cfg.device,
                               amp=False, tile_px=self.tile_px) if not fused or fx.methods != tuple(fused) else fx
            with f:
                out = f.forward(x, targets=t)
            probs.append(torch.softmax(torch.from_numpy(out.logits), 1).numpy())
            for m in fused:
                cams[m].append(minmax_maps(out.cams[m]))
        p = np.stack(probs, 1)
        res = {}
        for m in fused:
            sp = M.ensemble_spread(p, np.std(np.stack(cams[m], 1), axis=1), positive=self.positive_class)
            res[(m, "attn_std")] = sp["attn_std"]
        sp = M.ensemble_spread(p, np.zeros((len(x), 1, 1)), positive=self.positive_class, labels=labels)
        for k in ("prob_mean", "prob_std", "acc_mean", "acc_std"):
            if k in sp:
                res[("ensemble", k)] = sp[k]
        return res

    positive_class: int = 1
