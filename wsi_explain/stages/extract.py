"""The extraction stage: tiles + model -> ``slides/<id>/features.zarr``.

Arrays (first axis = ``tile_id``, the row of ``tiles.parquet``):

- ``embeddings`` (n, D) float32, ``logits`` (n, K) float32, ``targets`` (n,) int16 (class the CAMs explain)
- ``cams/<method>`` (n, h, w) float16 and ``cams_scale/<method>`` (n,) float32: the ReLU'd,
  unnormalised map at the target layer's resolution is ``cams[i] * cams_scale[i]`` (the float16
  part is divided by its per-tile maximum, so small raw values keep their precision)
- ``activations`` (n, C, h, w) float16, when enabled
- ``ensemble/probs`` (n, M, K), ``ensemble/probs_mean|probs_std`` (n, K) and
  ``ensemble/cams/<method>_mean|_std`` (n, h, w) float16 (per-model min-max normalised), with M > 1 models
- ``status`` (n,) int8: 0 pending, 1 ok, 2 decode failed, 3 non-finite output; ``done`` (n,) bool

Results are written per chunk of tiles (batches never cross a chunk), data first and ``done``
last, so a killed run resumes at the first chunk not done and ends with the same arrays.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wsi_explain.core.config import ExtractConfig
from wsi_explain.core.errors import WsiExplainError
from wsi_explain.core.perf import PartClock
from wsi_explain.core.run import STAGES, RunFolder, now_iso, params_hash
from wsi_explain.explain.extractors import build_attributors, build_extractors
from wsi_explain.explain.maps import scale_maps, softmax
from wsi_explain.io.features import STATUS_NONFINITE, STATUS_OK, STATUS_PENDING, STATUS_READ_ERROR  # noqa: F401
from wsi_explain.stages.driver import collect, guarded, record_failure
from wsi_explain.stages.extract_attributions import attribution_notes, run_attributors

__all__ = ["ExtractResult", "run_extract_stage", "extract_slide", "STAGE"]

logger = logging.getLogger(__name__)

STAGE = STAGES[1]  # "extract"


@dataclass
class ExtractResult:
    slide_id: str
    status: str  # done | skipped | failed
    n_tiles: int = 0
    n_read_errors: int = 0
    n_nonfinite: int = 0
    seconds: float = 0.0
    tiles_per_s: float = 0.0
    error: str | None = None
    problems: list = field(default_factory=list)
    #: seconds per part of the unit: read (waiting for decoded tiles), normalise, fused (the
    #: model's pass), write, load_model, attr:<method> (each attributor), and wall (start to end)
    timings: dict = field(default_factory=dict)


def _probe(fx, tile_px: int):
    import torch

    with fx:  # an empty region for a region target from annotations
        return fx.forward(torch.zeros(1, 3, tile_px, tile_px), masks=torch.zeros(1, tile_px, tile_px))


def extract_slide(
    slide_path: str,
    tiles,
    store: Path,
    extractors: list,
    cfg: ExtractConfig,
    *,
    params: str,
    mpp: float | None = None,
    on_tiles: Callable[[int], None] | None = None,
    regions=None,
) -> ExtractResult:
    """Run the fused pass over one slide's tiles into ``store`` (resumable).

    Parameters
    ----------
    slide_path : str
    tiles : DataFrame (the slide's tile table)
    store : Path of ``features.zarr``
    extractors : list of FusedExtractor (several = an ensemble of one architecture)
    cfg : ExtractConfig
    params : str
        Params hash; a store made with other params is rebuilt.
    on_tiles : callable(int), optional
        Called with the number of tiles finished after each batch (progress bars).
    regions : :class:`~wsi_explain.io.regions.AnnotationRegions`, optional
        The annotated area under each tile, for a segmentation model's ``region="annotation"``.
    """
    from wsi_explain.io.features import create_store, read_done, store_attrs, write_chunk
    from wsi_explain.io.loader import TileDataset, chunk_batches, tile_batches

    t0 = time.perf_counter()
    n = len(tiles)
    tile_px = int(tiles["tile_px"].iloc[0])
    main = extractors[0]
    probe = _probe(main, tile_px)
    attrs = store_attrs(extractors, probe, target=cfg.target)
    g = create_store(
        store, n=n, probe=probe, chunk_tiles=cfg.chunk_tiles, params=params, n_models=len(extractors), attrs=attrs
    )
    done = read_done(g)
    pending = np.flatnonzero(~done)
    dataset = TileDataset(slide_path, tiles, mpp=mpp, decoder=cfg.decoder)
    chunks = chunk_batches(pending, chunk=cfg.chunk_tiles, batch=cfg.batch_size)
    problems: list[str] = []
    n_new = 0
    contexts = [fx.__enter__() for fx in extractors]
    try:
        # one loader for the whole slide (workers start once); a chunk is written when its last batch is in
        flat = [(c, b) for c, batches in enumerate(chunks) for b in batches]
        last_of_chunk = {c: len(batches) for c, batches in enumerate(chunks)}
        seen: dict[int, int] = {}
        bufs: dict[int, dict] = {}
        reader = cfg.reader if cfg.reader != "auto" else ("processes" if main.device.type == "cuda" else "threads")
        loader = tile_batches(
            dataset, [b for _, b in flat], reader=reader, workers=cfg.workers, pin=main.device.type == "cuda"
        )
        clock = PartClock()
        for (c, _), (ids, imgs, ok, errs) in zip(flat, clock.iterate("read", loader)):
            with clock("normalise"):
                x = main.normalise(imgs)
            masks = None if regions is None else regions.masks(tiles.iloc[ids.numpy()], tile_px)
            with clock("fused"):
                outs = [fx.forward(x, masks=masks) for fx in contexts]
            _collect(bufs.setdefault(c, {}), outs, ok.numpy().astype(bool), list(errs), ids.numpy(), problems)
            n_new += len(ids)
            if on_tiles is not None:
                on_tiles(len(ids))
            seen[c] = seen.get(c, 0) + 1
            if seen[c] == last_of_chunk[c]:
                with clock("write"):
                    write_chunk(g, np.array([i for b in chunks[c] for i in b]), bufs.pop(c))
    finally:
        for fx in contexts:
            fx.__exit__(None, None, None)
    status = np.asarray(g["status"][:])
    secs = time.perf_counter() - t0
    return ExtractResult(
        slide_id="",
        status="done",
        n_tiles=n,
        n_read_errors=int((status == STATUS_READ_ERROR).sum()),
        n_nonfinite=int((status == STATUS_NONFINITE).sum()),
        seconds=secs,
        tiles_per_s=n_new / secs if secs > 0 else 0.0,
        problems=problems[:20],
        timings=clock.seconds,
    )


def _collect(buf: dict, outs: list, ok: np.ndarray, errs: list, ids: np.ndarray, problems: list) -> None:
    main = outs[0]
    finite = np.isfinite(main.logits).all(1) & np.isfinite(main.embeddings).all(1)
    for cam in main.cams.values():
        finite &= np.isfinite(cam).all((1, 2))
    status = np.where(~ok, STATUS_READ_ERROR, np.where(finite, STATUS_OK, STATUS_NONFINITE)).astype(np.int8)
    for i, e in zip(ids[~ok], np.array(errs, dtype=object)[~ok]):
        problems.append(f"tile {int(i)}: {e}")
    for i in ids[ok & ~finite]:
        problems.append(f"tile {int(i)}: non-finite model output (NaN or inf)")
    add = buf.setdefault
    add("embeddings", []).append(main.embeddings)
    add("logits", []).append(main.logits)
    if main.class_probs is not None:  # segmentation: mean probability per class
        add("class_probs", []).append(main.class_probs)
    add("targets", []).append(main.targets.astype(np.int16))
    add("status", []).append(status)
    for m, cam in main.cams.items():
        scale = cam.max(axis=(1, 2)) if cam.size else np.zeros(len(cam), np.float32)
        safe = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
        add(f"cams/{m}", []).append(cam / safe[:, None, None])
        add(f"cams_scale/{m}", []).append(scale.astype(np.float32))
    if main.activations is not None:
        add("activations", []).append(main.activations)
    if len(outs) > 1:
        probs = np.stack([softmax(o.logits) for o in outs], axis=1)  # (B, M, K)
        add("ensemble/probs", []).append(probs)
        add("ensemble/probs_mean", []).append(probs.mean(1))
        add("ensemble/probs_std", []).append(probs.std(1))
        for m in main.cams:
            stack = np.stack([scale_maps(o.cams[m]) for o in outs], axis=1)  # (B, M, h, w)
            add(f"ensemble/cams/{m}_mean", []).append(stack.mean(1))
            add(f"ensemble/cams/{m}_std", []).append(stack.std(1))


def _input_fingerprint(tile_rec: dict, tiles_path: Path, weights_hashes: list[str]) -> str:
    st = tiles_path.stat()
    blob = json.dumps([tile_rec.get("fingerprint"), tile_rec.get("params"), st.st_size, weights_hashes])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


#: extractors and attributors built in this process, by (config, tile_px, device): a Dask worker
#: loads the model once for all the slides it is given
_MODELS: dict[tuple, tuple] = {}


def _file_key(path: str | None) -> tuple:
    try:
        st = Path(path).stat() if path else None
    except OSError:
        return (path,)
    return (path, st.st_mtime_ns, st.st_size) if st else (None,)


def _models(cfg: ExtractConfig, tile_px: int) -> tuple[list, list]:
    # the key holds the checkpoints' mtimes and sizes: a file replaced in place is reloaded
    key = (cfg.model_dump_json(), tile_px, _file_key(cfg.weights), _file_key(cfg.card)) + tuple(
        _file_key(w) for w in cfg.ensemble
    )
    if key not in _MODELS:
        extractors = build_extractors(cfg, tile_px)
        if extractors[0].device.type == "cpu":
            from wsi_explain.core.perf import tune_malloc

            tune_malloc()
        _MODELS.clear()
        _MODELS[key] = (extractors, build_attributors(cfg, extractors[0], tile_px))
    return _MODELS[key]


def extract_task(sid: str, run_path: str, cfg: ExtractConfig, params: str, tile_px: int, on_tiles=None) -> dict:
    """Extract one slide of a run (a task: runs here or on a Dask worker). Never raises for a
    bad slide: returns ``{"ok": False, "error": message}`` (:func:`~wsi_explain.stages.driver.guarded`)
    so the parent records it."""
    from wsi_explain.core.executor import worker_setup
    from wsi_explain.io.regions import AnnotationRegions
    from wsi_explain.io.tile_table import read_tile_table

    device = worker_setup()
    if device is not None and cfg.device == "auto":
        cfg = cfg.model_copy(update={"device": device})
    rel = Path("slides") / sid / "features.zarr"
    store = Path(run_path) / rel

    def work() -> dict:
        t0 = time.perf_counter()
        extractors, attributors = _models(cfg, tile_px)
        load = time.perf_counter() - t0
        tiles, meta = read_tile_table(Path(run_path) / "slides" / sid / "tiles.parquet")
        regions = AnnotationRegions(meta, cfg.region_labels) if cfg.region == "annotation" else None
        res = extract_slide(
            meta["slide_path"],
            tiles,
            store,
            extractors,
            cfg,
            params=params,
            mpp=meta.get("level0_mpp"),
            on_tiles=on_tiles,
            regions=regions,
        )
        res.slide_id = sid
        res.timings.update(run_attributors(meta, tiles, store, extractors[0], cfg, params, attributors, regions))
        res.problems[:0] = attribution_notes(store, cfg)  # first: tile-level problems can be many
        # the unit's honest figures: wall time from start to end (model load, fused pass and every
        # attributor) and tiles per second over it; the fused pass's own time stays in timings
        n_new, wall = res.tiles_per_s * res.seconds, time.perf_counter() - t0
        res.timings.update(load_model=round(load, 4), fused_pass_wall=round(res.seconds, 4), wall=round(wall, 4))
        res.seconds, res.tiles_per_s = wall, n_new / wall if wall > 0 else 0.0
        return {"result": res, "output": str(rel)}

    return guarded("extracting", f"slide {sid}", work)


def _skip_check(run: RunFolder, ids: list[str], tile_stage: dict, params: str, weights_hashes: list[str]):
    """-> (results of slides not tiled (recorded as failed) or already extracted, slides to
    extract, their input fingerprints)."""
    results: dict[str, ExtractResult] = {}
    pending, fps = [], {}
    for sid in ids:
        tiles_path = run.slide_dir(sid) / "tiles.parquet"
        rec = tile_stage.get(sid)
        if not rec or rec.get("status") != "done" or not tiles_path.exists():
            msg = f"slide {sid}: not tiled (run `wsi-explain tile` first)"
            results[sid] = _failed(run, sid, params, None, now_iso(), 0.0, msg)
            continue
        fps[sid] = _input_fingerprint(rec, tiles_path, weights_hashes)
        if run.is_done(STAGE, sid, params=params, fingerprint=fps[sid]):
            old = run.slide_record(STAGE, sid)
            results[sid] = ExtractResult(
                sid,
                "skipped",
                n_tiles=old.get("n_tiles", 0),
                n_read_errors=old.get("n_read_errors", 0),
                n_nonfinite=old.get("n_nonfinite", 0),
            )
        else:
            pending.append(sid)
    return results, pending, fps


def run_extract_stage(
    run: RunFolder,
    cfg: ExtractConfig,
    *,
    slide_ids: list[str] | None = None,
    on_tiles: Callable[[int], None] | None = None,
    on_slide: Callable[[ExtractResult], None] | None = None,
    executor=None,
) -> list[ExtractResult]:
    """Extract features for every tiled slide of the run (or ``slide_ids``).

    The model is loaded and checked (output size, layer names) once, before any tile is read;
    model errors raise :class:`wsi_explain.explain.card.ModelError`. Per-slide failures are recorded in
    the manifest and the other slides go on; decode failures and non-finite outputs are per tile
    (``status`` array) and reported in the manifest. ``executor`` runs the slides (default: here,
    in order; a ``DaskExecutor`` spreads them over workers, each loading the model once).
    """
    from wsi_explain.core.executor import SerialExecutor
    from wsi_explain.io.tile_table import read_tile_table

    executor = executor or SerialExecutor()
    tile_stage = run.stage(STAGES[0])["slides"]  # the tiling stage's records
    ids = slide_ids or [s for s, r in tile_stage.items() if r.get("status") == "done"]
    if not ids:
        raise WsiExplainError(f"{run.path}: no tiled slide to extract; run `wsi-explain tile` first")
    first_tiles, _ = read_tile_table(run.slide_dir(ids[0]) / "tiles.parquet")
    tile_px = int(first_tiles["tile_px"].iloc[0])
    extractors, _ = _models(cfg, tile_px)  # raises before any tile is read
    params = params_hash(cfg.result_params())
    run.set_config(STAGE, cfg.model_dump(mode="json"))
    if cfg.activations:
        n_total = sum(tile_stage[s].get("n_tiles", 0) for s in ids if s in tile_stage)
        shape = _probe(extractors[0], tile_px).activations.shape[1:]
        gb = n_total * int(np.prod(shape)) * 2 / 1e9
        logger.info(
            "spatial activations: %d tiles x %s float16 = %.2f GB before compression", n_total, tuple(shape), gb
        )
    weights_hashes = [fx.model.weights_hash for fx in extractors]
    results, pending, fps = _skip_check(run, ids, tile_stage, params, weights_hashes)
    for res in results.values():
        if on_slide is not None:
            on_slide(res)
    extra = (on_tiles,) if isinstance(executor, SerialExecutor) else ()

    def done(sid: str, out: dict) -> ExtractResult:
        res = out["result"]
        run.record(
            STAGE,
            sid,
            status="done",
            params=params,
            fingerprint=fps[sid],
            outputs=[out["output"]],
            n_tiles=res.n_tiles,
            n_read_errors=res.n_read_errors,
            n_nonfinite=res.n_nonfinite,
            problems=res.problems,
            tiles_per_s=round(res.tiles_per_s, 2),
            start=out["start"],
            end=out["end"],
            seconds=round(res.seconds, 3),
            timings=res.timings,
            error=None,
        )
        return res

    def failed(sid: str, out: dict) -> ExtractResult:
        return _failed(run, sid, params, fps[sid], out["start"], out["seconds"], out["error"])

    outcomes = executor.map(extract_task, pending, str(run.path), cfg, params, tile_px, *extra)
    hint = "finished slides and chunks are kept: free space and rerun to resume"
    results.update(collect(outcomes, done=done, failed=failed, on_slide=on_slide, resume_hint=hint))
    return [results[s] for s in ids]


def _failed(run, sid, params, fp, start, seconds, msg) -> ExtractResult:
    record_failure(run, STAGE, sid, params=params, fingerprint=fp, start=start, seconds=seconds, error=msg)
    return ExtractResult(sid, "failed", seconds=seconds, error=msg)
