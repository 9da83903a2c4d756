"""The expensive metrics of one cluster's sample of tiles, re-read from the slides.

:class:`SampleScorer` holds what every cluster shares (the model, the explainers, the slides'
tile tables and annotations) and :meth:`SampleScorer.score` turns a sample into per-tile values
(long format: slide_id, tile_id, cluster, method, metric, value) plus the randomisation curve.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from wsi_explain import metrics as M
from wsi_explain.core.config import ExtractConfig, ScoreConfig
from wsi_explain.explain.maps import minmax_maps
from wsi_explain.io.samples import SampleReader, grades_for
from wsi_explain.metrics._common import softmax_outputs

__all__ = ["SampleScorer", "sample_clusters", "grades_for"]

logger = logging.getLogger(__name__)

VALUE_COLUMNS = ["slide_id", "tile_id", "cluster", "method", "metric", "value"]


def _localisation(m: str, maps, regions: tuple, threshold: float) -> dict:
    """Pointing game, graded hit, relevance mass and rank, IoU and coverage against the sample's
    annotation regions, keyed (method, metric)."""
    region, codes, grade_of = regions
    io = M.iou_coverage(maps, region, threshold=threshold)
    return {
        (m, "pointing_game"): M.pointing_game(maps, region),
        (m, "graded_hit"): M.graded_hit(maps, codes, grades=grade_of),
        (m, "relevance_mass"): M.relevance_mass(maps, region),
        (m, "relevance_rank"): M.relevance_rank(maps, region),
        (m, "iou"): io["iou"],
        (m, "coverage"): io["coverage"],
    }


def _long_values(sample: pd.DataFrame, cluster: int, cols: dict) -> pd.DataFrame:
    """{(method, metric): (N,) values} -> long DataFrame with :data:`VALUE_COLUMNS`."""
    rows = [
        pd.DataFrame(
            {
                "slide_id": sample["slide_id"],
                "tile_id": sample["tile_id"].astype(np.int64),
                "cluster": cluster,
                "method": m,
                "metric": k,
                "value": v.astype(np.float64),
            }
        )
        for (m, k), v in cols.items()
    ]
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=VALUE_COLUMNS)


def _fused_group(model, methods: tuple[str, ...], opts: dict):
    """A :class:`~wsi_explain.explain.fused_attributor.FusedCamGroup` of the fused CAMs among
    ``methods`` (None with fewer than two: nothing to share)."""
    from wsi_explain.explain.extractors import split_methods
    from wsi_explain.explain.fused_attributor import FusedCamGroup

    fused, _ = split_methods(methods)
    if len(fused) < 2:
        return None
    keep = {k: opts[k] for k in ("target_layer", "tile_px", "device", "region") if k in opts}
    return FusedCamGroup(model, methods=fused, **keep)


def _sample_notes(cluster: int, n: int, unread: list, zero: dict) -> list[str]:
    """What a cluster's scores rest on when the sample was not a plain one, in words: unreadable
    tiles left out, a single tile (no interval), methods whose maps are all zero on some tiles."""
    notes = []
    if unread:
        sid, tid, err = unread[0]
        left = n - len(unread)
        tail = f"scored on the other {left}" if left else "nothing left to score: the cluster has no sampled values"
        notes.append(
            f"cluster {cluster}: {len(unread)} of {n} sampled tiles could not be read and were left out "
            f"(first: slide {sid} tile {tid}: {err}); {tail}"
        )
    if n - len(unread) == 1:
        notes.append(f"cluster {cluster}: a single tile scored: its values have no confidence interval")
    for m, k in zero.items():
        if k:
            notes.append(
                f"cluster {cluster}: {m} maps are all zero on {k} of {n - len(unread)} tiles: there its "
                "sensitivity reads 0 (a map that never changes) and deletion/insertion remove pixels in index "
                "order, so those values say nothing about the method"
            )
    return notes


def sample_clusters(
    tiles: pd.DataFrame, *, per_cluster: int, seed: int, include_noise: bool = True
) -> dict[int, pd.DataFrame]:
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

    def __init__(
        self,
        run_path: Path,
        cfg: ScoreConfig,
        ecfg: ExtractConfig,
        methods: tuple[str, ...],
        positive_labels: tuple[str, ...],
        tile_px: int,
    ) -> None:
        from wsi_explain.explain.attributors import make_explainer
        from wsi_explain.explain.extractors import build_extractors, method_options

        self.run_path, self.cfg, self.methods, self.positive = run_path, cfg, methods, positive_labels
        self.tile_px = tile_px
        ecfg = ecfg.model_copy(update={"ensemble": (), "device": cfg.device, "amp": False})
        self.fx = build_extractors(ecfg, tile_px)[0]
        from wsi_explain.explain.segmentation import metric_module

        self.model = metric_module(self.fx.module)  # a segmentation net: read over its region target
        self.ecfg = ecfg
        card = self.fx.model.card
        self.black = tuple(-m / s for m, s in zip(card.mean, card.std))
        opts = dict(
            target_layer=self.fx.target_layer, tile_px=tile_px, max_batch=ecfg.attr_max_batch, device=cfg.device
        )
        if self.fx.region is not None:  # a segmentation model: the run's region target
            opts["region"] = self.fx.region
        self.annotated = self.fx.region == "mask"  # the region from the slides' annotations
        self._opts = opts
        self.group = _fused_group(self.fx.model, methods, opts)  # one fused pass for all scored CAMs
        self.explainers = {
            m: make_explainer(m, self.fx.model, group=self.group, **opts, **method_options(ecfg, m, fixed=True))
            for m in methods
        }
        self._extra = None
        self.reader = SampleReader(run_path, self.fx.normalise, positive_labels, cfg.grades)

    # -- inputs ----------------------------------------------------------------------------
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
        self._unread, self._zero = [], {}
        for s0 in range(0, len(sample), self.CHUNK):
            v, sn = self._score_chunk(cluster, sample.iloc[s0 : s0 + self.CHUNK].reset_index(drop=True), s0)
            vals.append(v)
            san.append(sn)
        values = pd.concat([v for v in vals if len(v)], ignore_index=True) if any(len(v) for v in vals) else vals[0]
        self.notes = _sample_notes(cluster, len(sample), self._unread, self._zero)
        return values, (pd.concat(san, ignore_index=True) if san else pd.DataFrame())

    def _score_chunk(self, cluster: int, sample: pd.DataFrame, offset: int) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Every metric family of the config on one chunk of the sample (``offset``: its first
        row in the sample, which seeds the noisy metrics)."""
        groups = set(self.cfg.groups)
        x, t, ok = self.reader.images(sample)
        self._unread += self.reader.errors
        sample, x, t = sample[ok].reset_index(drop=True), x[torch.from_numpy(ok)], t[ok]
        if len(sample) == 0:
            return pd.DataFrame(columns=VALUE_COLUMNS), pd.DataFrame()
        regions = self.reader.regions(sample, x.shape[-1]) if "localisation" in groups else None
        cols: dict[tuple[str, str], np.ndarray] = {}
        sanity_rows: list[dict] = []
        mk = self.reader.target_masks(sample, x.shape[-1], self.ecfg.region_labels) if self.annotated else None
        shared = self._shared(x, t, mk) if "faithfulness" in groups else None
        for m, ex in self.explainers.items():
            maps = ex.attribute(x, targets=t, masks=mk)
            self._zero[m] = self._zero.get(m, 0) + int((~np.asarray(maps).any(axis=(1, 2))).sum())
            if "faithfulness" in groups:
                cols.update(self._faithfulness(m, x, maps, t, offset, shared))
            if "robustness" in groups:
                cols.update(self._robustness(m, ex, x, t, offset, mk))
            if regions is not None:
                cols.update(_localisation(m, maps, regions, self.cfg.mask_threshold))
            if "sanity" in groups and self.cfg.sanity_tiles > 0 and offset == 0:
                cols.update(self._sanity(cluster, m, x, t, sanity_rows, mk))
        if "faithfulness" in groups:
            for r in self.cfg.references:  # the floor every method's number is compared with
                maps = M.reference_maps(r, len(x), tuple(x.shape[-2:]), seed=self.cfg.seed, first=offset)
                cols.update(self._faithfulness(r, x, maps, t, offset, shared))
        if "ensemble" in groups and self.cfg.models:
            labels = sample["label_pos"].to_numpy(np.float64) if "label_pos" in sample.columns else None
            cols.update(self._ensemble(x, t, labels, mk))
        return _long_values(sample, cluster, cols), pd.DataFrame(sanity_rows)

    def _shared(self, x: torch.Tensor, t: np.ndarray, masks) -> dict:
        """What every method's faithfulness metrics share on a chunk: the inputs' softmax
        (``softmax`` (N, K), ``clean`` (N,) target probabilities), each baseline image with its
        target probability (``baseline``/``baseline_probs``), built and forwarded once per tile, and
        for a segmentation model the region each tile's probability is read over (``regions``
        (N, H, W), the run's region target on the unperturbed tile; None for a classifier)."""
        from wsi_explain.explain.segmentation import metric_regions

        bs, rows = self.cfg.batch_size, np.arange(len(x))
        regions = metric_regions(self.model, x, t, region=self.fx.region, masks=masks, batch_size=bs)

        def softmax(z: torch.Tensor) -> np.ndarray:
            return softmax_outputs(self.model, z, batch_size=bs, regions=regions)

        soft = softmax(x)
        out = {"softmax": soft, "clean": soft[rows, t].astype(np.float32), "regions": regions}
        out["baseline"] = {b: M.make_baseline(x, b) for b in self.cfg.baselines}
        out["baseline_probs"] = {b: softmax(img)[rows, t].astype(np.float32) for b, img in out["baseline"].items()}
        return out

    def _faithfulness(self, m: str, x: torch.Tensor, maps, t: np.ndarray, offset: int, shared: dict) -> dict:
        """Deletion and insertion AUC per baseline, DiC/IiC, ROAD (on the first ``road_tiles`` of
        the sample) and infidelity, keyed (method, metric); the map-independent forwards come
        from ``shared`` (:meth:`_shared`)."""
        cfg, bs, cols = self.cfg, self.cfg.batch_size, {}
        clean, reg = shared["clean"], shared["regions"]
        kw = dict(targets=t, batch_size=bs, regions=reg)
        for base in cfg.baselines:
            for mode in ("deletion", "insertion"):
                c = M.perturbation_curve(
                    self.model,
                    x,
                    maps,
                    mode=mode,
                    baseline=shared["baseline"][base],
                    steps=cfg.steps,
                    clean_probs=clean,
                    baseline_probs=shared["baseline_probs"][base],
                    **kw,
                )
                cols[(m, f"{mode}_auc_{base}")] = M.curve_auc(c)
        for how in ("multiply", "mask"):
            cc = M.confidence_change(
                self.model,
                x,
                maps,
                how=how,
                threshold=cfg.mask_threshold,
                fill=self.black,
                clean_probs=clean,
                **kw,
            )
            cols[(m, f"dic_{how}")], cols[(m, f"iic_{how}")] = cc["drop"], cc["increase"]
        k = len(x) if cfg.road_tiles == 0 else max(0, min(len(x), cfg.road_tiles - offset))
        if k:
            r = M.road(
                self.model,
                x[:k],
                maps[:k],
                targets=t[:k],
                percentiles=cfg.road_percentiles,
                seed=cfg.seed + offset,
                batch_size=bs,
                clean_probs=clean[:k],
                regions=None if reg is None else reg[:k],
            )
            for name in ("morf", "lerf", "combined"):
                col = np.full(len(x), np.nan, np.float32)
                col[:k] = r[name]
                cols[(m, f"road_{name}")] = col
        cols[(m, "infidelity")] = M.infidelity_score(
            self.model,
            x,
            maps,
            targets=t,
            noise_std=cfg.infidelity_noise,
            n_samples=cfg.infidelity_samples,
            seed=cfg.seed + offset,
            max_examples_per_batch=max(bs, cfg.infidelity_samples),
            clean_outputs=shared["softmax"],
            regions=reg,
        )
        return cols

    def _robustness(self, m: str, ex, x: torch.Tensor, t: np.ndarray, offset: int, masks) -> dict:
        """Max-sensitivity of the method's maps, keyed (method, "sensitivity"); ``masks``: the
        tiles' regions of a target from annotations, kept for their perturbed copies."""
        cfg = self.cfg
        sens = M.sensitivity(
            lambda z, target=None, masks=None: ex.attribute(z, targets=target, masks=masks),
            x,
            targets=t,
            radius=cfg.sensitivity_radius,
            n_samples=cfg.sensitivity_samples,
            seed=cfg.seed + offset,
            max_examples_per_batch=max(cfg.batch_size, cfg.sensitivity_samples),
            masks=masks,
        )
        return {(m, "sensitivity"): sens}

    def _sanity(self, cluster: int, m: str, x: torch.Tensor, t: np.ndarray, rows: list, masks) -> dict:
        """The cascading randomisation on the first ``sanity_tiles`` tiles: appends the curve to
        ``rows`` and returns the per-tile values after full randomisation (NaN beyond)."""
        k = min(self.cfg.sanity_tiles, len(x))
        explain = self._sanity_explain(m, None if masks is None else masks[:k])
        steps = M.cascading_randomisation(self.model, explain, x[:k], targets=t[:k], seed=self.cfg.seed)
        for st in steps:
            spearman, ssim = float(np.nanmean(st["spearman"])), float(np.nanmean(st["ssim"]))
            rows.append(
                {
                    "cluster": cluster,
                    "method": m,
                    "step": st["step"],
                    "block": st["block"],
                    "spearman": spearman,
                    "ssim": ssim,
                    "n": k,
                }
            )
        full_sp = np.full(len(x), np.nan, np.float32)
        full_ss = np.full(len(x), np.nan, np.float32)
        full_sp[:k], full_ss[:k] = steps[-1]["spearman"], steps[-1]["ssim"]
        return {(m, "sanity_spearman"): full_sp, (m, "sanity_ssim"): full_ss}

    def _sanity_explain(self, method: str, masks):
        from wsi_explain.explain.attributors import make_explainer
        from wsi_explain.explain.extractors import method_options

        opts = {**self._opts, **method_options(self.ecfg, method, fixed=True)}

        def explain(module, z, targets):
            return make_explainer(method, module, **opts).attribute(z, targets=targets, masks=masks)

        return explain

    def _ensemble(self, x: torch.Tensor, t: np.ndarray, labels: np.ndarray | None, masks) -> dict:
        """Spread of the run's model and the ``--models`` checkpoints on the sample."""
        from wsi_explain.explain.extractors import build_extractors
        from wsi_explain.explain.fused import FusedExtractor

        if self._extra is None:
            self._extra = [
                build_extractors(self.ecfg.model_copy(update={"weights": w}), self.tile_px)[0] for w in self.cfg.models
            ]
        fused = [m for m in self.fx.methods]
        probs, cams = [], {m: [] for m in fused}
        for fx in [self.fx] + self._extra:
            f = (
                FusedExtractor(
                    fx.model,
                    methods=tuple(fused),
                    target_layer=fx.target_layer,
                    device=self.cfg.device,
                    amp=False,
                    tile_px=self.tile_px,
                    region=fx.region,
                )
                if not fused or fx.methods != tuple(fused)
                else fx
            )
            with f:
                out = f.forward(x, targets=t, masks=masks)
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
