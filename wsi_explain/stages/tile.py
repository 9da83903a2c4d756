"""The tiling stage: slides -> ``slides/<id>/tiles.parquet`` and a grid thumbnail.

Each slide is independent: a failure is recorded in the manifest with its reason and the
other slides finish. A slide whose params and fingerprint are unchanged is skipped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

import tiling
from wsi_explain.core.atomic import atomic_path, atomic_write_parquet
from wsi_explain.core.config import TileConfig
from wsi_explain.core.errors import SlideError
from wsi_explain.core.run import STAGES, RunFolder, params_hash
from wsi_explain.io.slides import SlideSource, slide_fingerprint
from wsi_explain.stages.driver import collect, guarded, record_failure

__all__ = ["TileResult", "tile_slide", "run_tile_stage", "STAGE"]

logger = logging.getLogger(__name__)

STAGE = STAGES[0]  # "tile"


@dataclass(frozen=True)
class TileResult:
    """Outcome of one slide in the tiling stage.

    ``status`` is ``"done"``, ``"skipped"`` (already done with the same inputs) or ``"failed"``.
    """

    slide_id: str
    path: str
    status: str
    n_tiles: int = 0
    tissue_frac: float = 0.0
    seconds: float = 0.0
    error: str | None = None
    qc: dict | None = None


def _verify(reader: tiling.SlideReader, tiles: pd.DataFrame, cfg: TileConfig) -> None:
    if cfg.verify == "none" or tiles.empty:
        return
    if cfg.verify == "all" or len(tiles) <= cfg.verify_n:
        idx = np.arange(len(tiles))
    else:
        idx = np.unique(np.linspace(0, len(tiles) - 1, cfg.verify_n).round().astype(int))
    for i in idx:
        tiling.read_tile(reader, tiles.iloc[int(i)])


def tile_slide(source: SlideSource, cfg: TileConfig, out_dir: Path, *, fingerprint: str) -> TileResult:
    """Tile one slide into ``out_dir`` (``tiles.parquet``, ``thumbnail.png``, ``tissue.png``), atomically.

    Raises
    ------
    tiling.SlideError
        Any per-slide problem (open, mpp, tissue, decode, annotations), naming the slide.
    """
    t0 = time.perf_counter()
    reader = tiling.open_slide(source.path, mpp=source.mpp, decoder="auto")
    try:
        tissue = tiling.detect_tissue(
            reader, target_mpp=cfg.tissue_mpp, min_object_um2=cfg.min_object_um2, find_ink=cfg.find_ink
        )
        try:
            tiles = tiling.make_grid(reader, tissue, cfg.grid_spec())
        except ValueError as exc:
            if isinstance(exc, SlideError):
                raise
            raise tiling.GridError(source.path, str(exc)) from exc
        if tiles.empty:
            raise tiling.NoTissueError(
                source.path,
                f"tissue found ({100 * tissue.tissue_fraction:.1f}% of the slide) but no tile reaches "
                f"min_tissue={cfg.min_tissue}; lower --min-tissue or the tile size",
            )
        if source.annotations is not None:
            ann = tiling.read_geojson(source.annotations)
            tiles = pd.concat([tiles, tiling.geojson_label_fractions(tiles, ann)], axis=1)
        if source.label_mask is not None:
            mask = tiling.read_label_mask(source.label_mask)
            fr = tiling.mask_label_fractions(
                tiles,
                mask,
                slide_dimensions=reader.info.dimensions,
                classes=cfg.label_classes,
                path=str(source.label_mask),
            )
            tiles = pd.concat([tiles, fr], axis=1)
        _verify(reader, tiles, cfg)
        qc = _qc_summary(tissue)
        if cfg.qc:
            tiles = _measure_tiles(reader, tiles, tissue, cfg, qc)
        if cfg.drop_artefacts:
            tiles = _drop_artefacts(tiles, cfg, qc, source.path)
        thumb = tiling.grid_thumbnail(tissue, tiles)
        info = reader.info
    finally:
        reader.close()
    _write_outputs(out_dir, tiles, thumb, source, cfg, fingerprint, info, tissue)
    return TileResult(
        slide_id=source.slide_id,
        path=str(source.path),
        status="done",
        n_tiles=len(tiles),
        tissue_frac=tissue.tissue_fraction,
        seconds=time.perf_counter() - t0,
        qc=qc,
    )


def _qc_summary(tissue: tiling.TissueMask) -> dict:
    return {"ink_on_tissue": round(tissue.ink_on_tissue_fraction, 4), "stains": tissue.stains.source}


def _measure_tiles(reader, tiles: pd.DataFrame, tissue, cfg: TileConfig, qc: dict) -> pd.DataFrame:
    """The per-tile QC columns; tiles that fail to decode get NaN (the extraction marks them too)."""
    errors: list[str] = []
    measured = tiling.compute_tile_qc(
        reader,
        tiles,
        tissue.stains,
        threads=cfg.qc_threads,
        on_error=lambda i, exc: errors.append(f"tile {i}: {exc.problem}"),
    )
    tiles = pd.concat([tiles, measured], axis=1)
    blank = int((tiles["stained_frac"] == 0).sum())
    qc.update(n_read_errors=len(errors), n_glass_tiles=blank)
    if errors:
        qc["read_errors"] = errors[:5]
        logger.warning(
            "%s tiles of %s failed to decode during QC (measures NaN), e.g. %s",
            len(errors),
            reader.info.path,
            errors[0],
        )
    if blank:
        logger.warning(
            "%s: %d tile(s) are all glass (no stained pixel): their stain measures are NaN", reader.info.path, blank
        )
        qc["note"] = f"{blank} tile(s) are all glass (no stained pixel): their stain and sharpness measures are NaN"
    return tiles


def _drop_artefacts(tiles: pd.DataFrame, cfg: TileConfig, qc: dict, path) -> pd.DataFrame:
    """Leave out tiles with ink fraction >= max_ink_frac or sharpness < min_sharpness; renumber tile ids."""
    bad = (tiles["ink_frac"] >= cfg.max_ink_frac) | (tiles["sharpness"] < cfg.min_sharpness)
    qc["n_dropped_artefacts"] = int(bad.sum())
    if bad.all():
        raise tiling.NoTissueError(
            path,
            f"every one of its {len(tiles)} tiles is an artefact (pen ink >= "
            f"{cfg.max_ink_frac:.0%} or sharpness < {cfg.min_sharpness}); "
            "tile it without --drop-artefacts",
        )
    tiles = tiles[~bad].reset_index(drop=True)
    tiles["tile_id"] = np.arange(len(tiles), dtype=np.int64)
    return tiles


def _write_outputs(out_dir, tiles, thumb, source, cfg, fingerprint, info, tissue) -> None:
    from PIL import Image

    meta = {
        "slide_id": source.slide_id,
        "slide_path": str(source.path),
        "slide_fingerprint": fingerprint,
        "tiling_config": cfg.model_dump(mode="json"),
        "level0_mpp": info.mpp,
        "level0_dimensions": list(info.dimensions),
        "vendor": info.vendor,
        "objective_power": info.objective_power,
        "tissue_mask_scale": tissue.scale,
        "stains": tissue.stains.to_dict(),
        "meta": source.meta,
        # annotation sources, for the localisation metrics (per-pixel masks are cut from them)
        "annotations": str(source.annotations) if source.annotations is not None else None,
        "label_mask": str(source.label_mask) if source.label_mask is not None else None,
        "label_classes": {str(k): v for k, v in (cfg.label_classes or {}).items()} or None,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "thumbnail.png", suffix=".png") as tmp:
        Image.fromarray(thumb).save(tmp, format="PNG")
    # the coded mask (tiling.MASK_CODES: 0 background, 1 tissue, 2 ink over tissue, 3 ink on glass)
    # at tissue_mask_scale level-0 px per pixel
    with atomic_path(out_dir / "tissue.png", suffix=".png") as tmp:
        Image.fromarray(tissue.coded()).save(tmp, format="PNG")
    # the plain slide image at the same scale (background of the report and explorer panels)
    with atomic_path(out_dir / "overview.png", suffix=".png") as tmp:
        Image.fromarray(np.ascontiguousarray(tissue.image[..., :3])).save(tmp, format="PNG")
    atomic_write_parquet(tiles, out_dir / "tiles.parquet", meta)


def _fingerprint(src: SlideSource) -> str:
    fp = slide_fingerprint(src.path)
    if src.annotations is not None and src.annotations.exists():
        fp = fp + ":" + slide_fingerprint(src.annotations)[:8]
    if src.label_mask is not None and src.label_mask.exists():
        fp = fp + ":" + slide_fingerprint(src.label_mask)[:8]
    return fp


def tile_task(src: SlideSource, cfg: TileConfig, run_path: str, fingerprints: dict[str, str] | None = None) -> dict:
    """Tile one slide into ``<run_path>/slides/<id>`` (a task: runs here or on a Dask worker).

    ``fingerprints`` (slide id -> fingerprint) are those the parent computed for its skip check;
    a slide without one is fingerprinted here. Never raises for a bad slide: returns
    ``{"ok": False, "error": message}`` instead (:func:`~wsi_explain.stages.driver.guarded`), so
    the parent records it and the batch goes on.
    """
    fp: dict[str, str | None] = {"value": (fingerprints or {}).get(src.slide_id)}

    def work() -> dict:
        if not src.path.exists():
            raise tiling.SlideNotFoundError(src.path, "no such file")
        fp["value"] = fp["value"] or _fingerprint(src)
        res = tile_slide(src, cfg, Path(run_path) / "slides" / src.slide_id, fingerprint=fp["value"])
        return {"result": res}

    return {**guarded("tiling", str(src.path), work), "fingerprint": fp["value"]}


def _skip_check(run: RunFolder, sources: list[SlideSource], params: str) -> tuple[dict, list, dict]:
    """-> (results of the slides already done, slides to tile, their fingerprints)."""
    done, pending, fps = {}, [], {}
    for src in sources:
        try:
            fp = _fingerprint(src) if src.path.exists() else None
        except OSError:
            fp = None
        if fp is not None and run.is_done(STAGE, src.slide_id, params=params, fingerprint=fp):
            rec = run.slide_record(STAGE, src.slide_id)
            done[src.slide_id] = TileResult(
                src.slide_id,
                str(src.path),
                "skipped",
                n_tiles=rec.get("n_tiles", 0),
                tissue_frac=rec.get("tissue_frac", 0.0),
            )
        else:
            pending.append(src)
            if fp is not None:
                fps[src.slide_id] = fp
    return done, pending, fps


def run_tile_stage(
    run: RunFolder,
    sources: list[SlideSource],
    cfg: TileConfig,
    *,
    on_slide: Callable[[TileResult], None] | None = None,
    executor=None,
) -> list[TileResult]:
    """Tile every slide of the batch into the run folder.

    Parameters
    ----------
    run : RunFolder
    sources : list of SlideSource
    cfg : TileConfig
    on_slide : callable, optional
        Called with each slide's :class:`TileResult` (progress bars).
    executor : :class:`wsi_explain.core.executor.SerialExecutor` or ``DaskExecutor``, optional
        Where the slides are tiled (default: here, in order).

    Returns
    -------
    list of TileResult, one per source, in order. Failures are recorded in the manifest with
    their message; they never stop the batch.
    """
    from wsi_explain.core.executor import SerialExecutor

    params = params_hash(cfg.result_params())
    run.set_config(STAGE, cfg.model_dump(mode="json"))
    executor = executor or SerialExecutor()
    results, pending, fps = _skip_check(run, sources, params)
    for res in results.values():
        if on_slide is not None:
            on_slide(res)

    def done(src: SlideSource, out: dict) -> TileResult:
        res, rel = out["result"], Path("slides") / src.slide_id
        run.record(
            STAGE,
            src.slide_id,
            status="done",
            path=str(src.path),
            params=params,
            fingerprint=out["fingerprint"],
            outputs=[str(rel / "tiles.parquet"), str(rel / "thumbnail.png"), str(rel / "tissue.png")],
            n_tiles=res.n_tiles,
            tissue_frac=res.tissue_frac,
            start=out["start"],
            end=out["end"],
            seconds=round(res.seconds, 3),
            error=None,
            meta=src.meta,
            qc=res.qc,
        )
        return res

    def failed(src: SlideSource, out: dict) -> TileResult:
        record_failure(
            run,
            STAGE,
            src.slide_id,
            params=params,
            fingerprint=out["fingerprint"],
            start=out["start"],
            seconds=out["seconds"],
            error=out["error"],
            path=str(src.path),
            meta=src.meta,
        )
        return TileResult(src.slide_id, str(src.path), "failed", seconds=out["seconds"], error=out["error"])

    outcomes = executor.map(tile_task, pending, cfg, str(run.path), fps)
    hint = "slides finished so far are kept: free space and rerun to resume"
    for src, res in collect(outcomes, done=done, failed=failed, on_slide=on_slide, resume_hint=hint):
        results[src.slide_id] = res
    return [results[s.slide_id] for s in sources]
