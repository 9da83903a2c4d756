"""The per-slide features store ``features.zarr``: created and written chunk by chunk by the
extraction stage (:func:`create_store`, :func:`write_chunk`, :func:`read_done`), read by every
later stage (:func:`open_store`, :func:`read_cams`), and grown with attribution maps of other
methods (:func:`attribute_tiles`, :func:`add_attributions`).

Attributions of methods outside the fused pass (captum, ScoreCAM...) are costly, so they run on
all tiles or on a given subset; they are stored in ``attributions/<method>/`` with
``tile_ids`` (m,) int64 and ``maps`` (m, px, px) float32 (area-averaged from the input size),
and for Integrated Gradients each tile's ``completeness_error`` and ``completeness_delta`` (m,)
float32 and ``n_steps`` (m,) int32 (:mod:`wsi_explain.explain.integrated_gradients`).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = [
    "open_store",
    "read_cams",
    "stored_methods",
    "read_maps",
    "attribute_tiles",
    "add_attributions",
    "create_store",
    "read_done",
    "write_chunk",
    "store_attrs",
    "STATUS_PENDING",
    "STATUS_OK",
    "STATUS_READ_ERROR",
    "STATUS_NONFINITE",
]

#: ``status`` (n,) int8 of each tile in the store: not done yet, ok, failed to decode, NaN/inf output
STATUS_PENDING, STATUS_OK, STATUS_READ_ERROR, STATUS_NONFINITE = 0, 1, 2, 3

logger = logging.getLogger(__name__)


def open_store(path: str | Path, mode: str = "r"):
    import zarr

    return zarr.open_group(str(path), mode=mode)


def read_cams(store, method: str, idx: np.ndarray | slice | None = None) -> np.ndarray:
    """Raw (ReLU'd, unnormalised) CAMs ``(m, h, w)`` float32 of tiles ``idx`` (default all)."""
    sel = slice(None) if idx is None else idx
    if isinstance(sel, slice):
        maps = np.asarray(store[f"cams/{method}"][sel], np.float32)
        scale = np.asarray(store[f"cams_scale/{method}"][sel], np.float32)
    else:
        maps = np.asarray(store[f"cams/{method}"].oindex[np.asarray(sel)], np.float32)
        scale = np.asarray(store[f"cams_scale/{method}"].oindex[np.asarray(sel)], np.float32)
    return maps * scale[:, None, None]


def stored_methods(store) -> list[str]:
    """The maps a slide's store holds: its fused CAMs (every tile), then the attributions of its
    sampled tiles, each sorted by name."""
    cams = sorted(store["cams"].keys()) if "cams" in store else []
    return cams + (sorted(store["attributions"].keys()) if "attributions" in store else [])


def read_maps(store, method: str, tile_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A stored method's maps for the tiles ``tile_ids`` (m,) int.

    Returns
    -------
    have : (m,) bool, the tiles that have the map (all of them for a fused CAM; the sampled ones
        for an attribution).
    maps : (have.sum(), h, w) float32, in the order of ``tile_ids``: raw CAMs (:func:`read_cams`) or
        the attribution maps as stored.

    Raises KeyError for a method the store does not hold.
    """
    ids = np.asarray(tile_ids, np.int64).reshape(-1)
    if f"cams/{method}" in store:
        return np.ones(len(ids), bool), read_cams(store, method, ids)
    if f"attributions/{method}" not in store:
        raise KeyError(f"no stored maps for method {method!r}")
    have_ids = np.asarray(store[f"attributions/{method}/tile_ids"][:], np.int64)
    uniq, first = np.unique(have_ids, return_index=True)  # a repeated id: its first map
    j = np.clip(np.searchsorted(uniq, ids), 0, max(len(uniq) - 1, 0))
    have = (uniq[j] == ids) if len(uniq) else np.zeros(len(ids), bool)
    pos = first[j] if len(uniq) else np.zeros(len(ids), np.int64)
    arr = store[f"attributions/{method}/maps"]
    maps = np.asarray(arr.oindex[pos[have]], np.float32) if have.any() else np.zeros((0,) + arr.shape[1:], np.float32)
    return have, maps


def _pool(maps: np.ndarray, px: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    if maps.shape[-1] == px and maps.shape[-2] == px:
        return maps.astype(np.float32)
    return F.adaptive_avg_pool2d(torch.from_numpy(np.ascontiguousarray(maps, np.float32))[:, None], px)[:, 0].numpy()


def attribute_tiles(
    slide_path: str,
    tiles,
    attributor,
    *,
    tile_ids: np.ndarray,
    normalise: Callable,
    batch_size: int = 16,
    out_px: int = 56,
    mpp: float | None = None,
    targets: np.ndarray | None = None,
    masks: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Maps of ``attributor`` for the given tiles, read from the slide in batches.

    Parameters
    ----------
    slide_path : str
    tiles : DataFrame (the slide's tile table)
    attributor : :class:`wsi_explain.explain.attributors.Attributor`
    tile_ids : (m,) int
    normalise : callable uint8 (N, H, W, 3) -> normalised float (N, 3, H, W)
    out_px : int
        Stored map size (area-averaged from the input size).
    targets : (m,) int, optional
        Classes to explain (default: the predicted class).
    masks : (m, H, W) bool, optional
        The tiles' regions (a segmentation model's region target from annotations).

    Returns
    -------
    maps : (m, out_px, out_px) float32.
    diagnostics : dict name -> (m,) array
        The attributor's per-tile ``last_diagnostics`` where it has them (Integrated Gradients:
        ``completeness_error``, ``completeness_delta``, ``n_steps``), else empty.
    """
    from wsi_explain.io.loader import TileDataset

    ds = TileDataset(slide_path, tiles, mpp=mpp)
    out = np.zeros((len(tile_ids), out_px, out_px), np.float32)
    diag: dict[str, list] = {}
    for s in range(0, len(tile_ids), batch_size):
        ids = tile_ids[s : s + batch_size]
        items = [ds[int(i)] for i in ids]
        imgs = np.stack([it[1].numpy() for it in items])
        t = None if targets is None else targets[s : s + batch_size]
        m = None if masks is None else masks[s : s + batch_size]
        maps = attributor.attribute(normalise(imgs), targets=t, masks=m)
        out[s : s + len(ids)] = _pool(maps, out_px)
        for k, v in (getattr(attributor, "last_diagnostics", None) or {}).items():
            diag.setdefault(k, []).append(np.asarray(v))
    return out, {k: np.concatenate(v) for k, v in diag.items()}


def add_attributions(
    store_path: str | Path, method: str, tile_ids: np.ndarray, maps: np.ndarray, diagnostics: dict | None = None
) -> None:
    """Write (replace) ``attributions/<method>`` in a slide's feature store: ``tile_ids`` (m,),
    ``maps`` (m, px, px) and each per-tile diagnostic (m,) under its own name."""
    g = open_store(store_path, mode="r+")
    name = f"attributions/{method}"
    if name in g:
        del g[name]
    grp = g.require_group(name)
    grp.create_array("tile_ids", data=np.asarray(tile_ids, np.int64))
    grp.create_array("maps", data=np.asarray(maps, np.float32), chunks=(min(len(maps), 64),) + maps.shape[1:])
    for k, v in (diagnostics or {}).items():
        grp.create_array(k, data=np.asarray(v))


def create_store(path: Path, *, n: int, probe, chunk_tiles: int, params: str, n_models: int, attrs: dict):
    """Open the slide's ``features.zarr`` for writing, or create it afresh (when it is missing,
    unreadable, or made with other ``params`` or another tile count) with every array sized for
    ``n`` tiles, shaped like ``probe`` (the fused pass's output on one tile), chunked by
    ``chunk_tiles`` tiles; ``attrs`` (model, layers, classes, methods) go in its attributes."""
    import zarr

    if path.exists():
        try:
            g = zarr.open_group(str(path), mode="r+")
            if g.attrs.get("params") == params and g.attrs.get("n_tiles") == n:
                return g
        except Exception as exc:  # unreadable store: start again
            logger.warning("%s: unreadable feature store, recreating (%s)", path, exc)
        shutil.rmtree(path)
    g = zarr.open_group(str(path), mode="w")
    c = chunk_tiles

    def arr(name, shape, dtype, fill=0):
        g.create_array(name, shape=shape, chunks=(c,) + tuple(shape[1:]), dtype=dtype, fill_value=fill)

    arr("embeddings", (n, probe.embeddings.shape[1]), "float32")
    arr("logits", (n, probe.logits.shape[1]), "float32")
    if getattr(probe, "class_probs", None) is not None:  # segmentation models
        arr("class_probs", (n, probe.class_probs.shape[1]), "float32")
    arr("targets", (n,), "int16", -1)
    for m, cam in probe.cams.items():
        arr(f"cams/{m}", (n,) + cam.shape[1:], "float16")
        arr(f"cams_scale/{m}", (n,), "float32")
    if probe.activations is not None:
        arr("activations", (n,) + probe.activations.shape[1:], "float16")
    if n_models > 1:
        k = probe.logits.shape[1]
        arr("ensemble/probs", (n, n_models, k), "float32")
        arr("ensemble/probs_mean", (n, k), "float32")
        arr("ensemble/probs_std", (n, k), "float32")
        for m, cam in probe.cams.items():
            arr(f"ensemble/cams/{m}_mean", (n,) + cam.shape[1:], "float16")
            arr(f"ensemble/cams/{m}_std", (n,) + cam.shape[1:], "float16")
    arr("status", (n,), "int8")
    arr("done", (n,), "bool", False)
    g.attrs.update({**attrs, "params": params, "n_tiles": n, "chunk_tiles": c})
    return g


def read_done(g) -> np.ndarray:
    """(n,) bool: the tiles whose chunk was written completely."""
    try:
        return np.asarray(g["done"][:], dtype=bool)
    except Exception:  # a chunk file cut by a kill: treat everything as not done
        return np.zeros(g.attrs["n_tiles"], bool)


def write_chunk(g, idx: np.ndarray, buf: dict) -> None:
    """Write one chunk's arrays (``buf``: name -> list of batch arrays, rows ``idx``), then mark
    the rows done: data first and ``done`` last, so a kill in between leaves the chunk pending."""
    if len(idx) == 0:
        return
    lo, hi = int(idx.min()), int(idx.max()) + 1
    contiguous = hi - lo == len(idx) and (np.diff(idx) == 1).all()
    for name, parts in buf.items():
        data = np.concatenate(parts)
        arr = g[name]
        data = data.astype(arr.dtype, copy=False)
        if contiguous:
            arr[lo:hi] = data
        else:
            arr.oindex[idx] = data
    # done last: a kill before this line leaves the chunk pending
    if contiguous:
        g["done"][lo:hi] = True
    else:
        g["done"].oindex[idx] = np.ones(len(idx), bool)


def store_attrs(extractors: list, probe, *, target: str) -> dict:
    """What ``features.zarr`` records of the model: id, weights, layers, normalisation, classes,
    methods, target and CAM shape (``extractors``: the fused extractors, the run's model first;
    ``probe``: the main extractor's output on one tile)."""
    main = extractors[0]
    return {
        "model_id": main.model.model_id,
        "weights_hash": [fx.model.weights_hash for fx in extractors],
        "target_layer": main.target_layer,
        "embedding_layer": main.embedding_layer,
        "task": main.model.card.task,
        "region": main.region,
        "normalisation": {"mean": list(main.model.card.mean), "std": list(main.model.card.std)},
        "class_names": list(main.model.card.class_names),
        "methods": list(main.methods),
        "target": target,
        "cam_shape": list(next(iter(probe.cams.values())).shape[1:]) if probe.cams else [],
    }
