"""The extraction's methods outside the fused pass (captum, pytorch-grad-cam): run on a seeded
sample of each slide's tiles, stored in its ``features.zarr`` (``attributions/<method>``), and
their quality notes (Integrated Gradients' completeness) for the slide's record."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from wsi_explain.core.config import ExtractConfig

__all__ = ["run_attributors", "attribution_notes"]


def run_attributors(meta: dict, tiles, store: Path, fx, cfg: ExtractConfig, params: str, attributors, regions) -> dict:
    """Methods outside the fused pass, on a seeded sample of tiles, explaining the same targets;
    returns the seconds of each (``attr:<method>``)."""
    from wsi_explain.io.features import STATUS_OK, add_attributions, attribute_tiles, open_store

    secs: dict[str, float] = {}
    if not attributors:
        return secs
    g = open_store(store, mode="r")
    ok = np.flatnonzero(np.asarray(g["status"][:]) == STATUS_OK)
    targets_all = np.asarray(g["targets"][:], np.int64)
    k = len(ok) if cfg.attr_sample == 0 else min(cfg.attr_sample, len(ok))
    ids = ok if k == len(ok) else np.sort(np.random.default_rng(cfg.seed).choice(ok, k, replace=False))
    masks = None if regions is None else regions.masks(tiles.iloc[ids], int(tiles["tile_px"].iloc[0]))
    for att in attributors:
        name = f"attributions/{att.name}"
        if name in g and g[name].attrs.get("params") == params:
            continue  # already done in an earlier (killed) run
        t0 = time.perf_counter()
        maps, diag = attribute_tiles(
            meta["slide_path"],
            tiles,
            att,
            tile_ids=ids,
            normalise=fx.normalise,
            batch_size=cfg.batch_size,
            out_px=cfg.attr_px,
            mpp=meta.get("level0_mpp"),
            targets=targets_all[ids],
            masks=masks,
        )
        add_attributions(store, att.name, ids, maps, diag)
        open_store(store, mode="r+")[name].attrs.update({"params": params, "out_px": cfg.attr_px})
        secs[f"attr:{att.name}"] = round(time.perf_counter() - t0, 4)
    return secs


def attribution_notes(store: Path, cfg: ExtractConfig) -> list[str]:
    """One line per stored Integrated Gradients whose maps stay above the completeness tolerance
    (recorded among the slide's problems in the manifest, shown by ``status``)."""
    from wsi_explain.explain.extractors import IG
    from wsi_explain.explain.integrated_gradients import incomplete
    from wsi_explain.io.features import open_store

    g = open_store(store, mode="r")
    name = f"attributions/{IG}"
    if name not in g or "completeness_error" not in g[name]:
        return []
    err, steps = np.asarray(g[name]["completeness_error"][:]), np.asarray(g[name]["n_steps"][:])
    delta = (
        np.asarray(g[name]["completeness_delta"][:]) if "completeness_delta" in g[name] else np.full_like(err, np.inf)
    )
    bad = incomplete(err, delta, tolerance=cfg.ig_tolerance)  # NaN counts as incomplete
    if not bad.any():
        return []
    finite = err[bad][np.isfinite(err[bad])]
    largest = f"largest {float(finite.max()):.0%}" if len(finite) else "not finite"
    return [
        f"integratedgradients: {int(bad.sum())} of {len(err)} maps above {cfg.ig_tolerance:.0%} completeness "
        f"error at {int(steps[bad].max())} steps ({largest}); raise --ig-max-steps"
    ]
