"""Reading a slide's tiles in DataLoader worker processes (one slide handle per worker)."""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

import tiling

__all__ = ["TileDataset", "chunk_batches", "make_loader", "thread_loader", "tile_batches"]

logger = logging.getLogger(__name__)


class TileDataset(Dataset):
    """Tiles of one slide, read and resized on demand.

    Each item is ``(tile_id, image, ok, error)`` with image (tile_px, tile_px, 3) uint8; a tile
    that fails to decode gives a zero image, ``ok=False`` and the error text (the reader is
    re-opened, since OpenSlide handles stay in error after a failure). Each reading thread and
    each worker process has its own slide handle.

    Parameters
    ----------
    path : str
        Slide file (re-opened in each worker process).
    tiles : DataFrame
        The slide's tile table (x, y, level, read_w, read_h, tile_px).
    mpp : float, optional
        Level-0 µm per pixel override used at tiling time.
    decoder : {"auto", "openslide"}
        :func:`tiling.open_slide`'s: "auto" decodes a tiled TIFF's tiles directly (same pixels).
    """

    def __init__(self, path: str, tiles: pd.DataFrame, *, mpp: float | None = None, decoder: str = "auto") -> None:
        self.path = str(path)
        self.mpp = mpp
        self.decoder = decoder
        cols = ["x", "y", "level", "read_w", "read_h", "tile_px"]
        self._rows = tiles[cols].to_numpy(np.int64)
        self._local = threading.local()  # one slide handle per reading thread (and per process)

    def __len__(self) -> int:
        return len(self._rows)

    def _get_reader(self):
        loc = self._local
        if getattr(loc, "reader", None) is None or loc.pid != os.getpid():
            loc.reader = tiling.open_slide(self.path, mpp=self.mpp, decoder=self.decoder)
            loc.pid = os.getpid()
        return loc.reader

    def __getitem__(self, i: int):
        x, y, level, rw, rh, px = (int(v) for v in self._rows[i])
        try:
            img = tiling.read_tile(
                self._get_reader(), {"x": x, "y": y, "level": level, "read_w": rw, "read_h": rh, "tile_px": px}
            )
            img = np.require(img, requirements=("C", "W"))  # PIL's arrays can be read-only
            return i, torch.from_numpy(img), True, ""
        except tiling.SlideError as exc:
            reader = getattr(self._local, "reader", None)
            if reader is not None:  # OpenSlide handles stay in error: re-open on the next tile
                reader.close()
            self._local.reader = None
            return i, torch.zeros((px, px, 3), dtype=torch.uint8), False, str(exc)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_local"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()


def chunk_batches(pending: np.ndarray, *, chunk: int, batch: int) -> list[list[list[int]]]:
    """Group pending tile indices by chunk (``index // chunk``), then into batches.

    Batches never cross a chunk boundary, so a chunk's results can be written (and marked done)
    as soon as its last batch is processed.

    Returns
    -------
    list (one per chunk) of lists of batches (lists of tile indices).
    """
    out = []
    if len(pending) == 0:
        return out
    keys = pending // chunk
    for k in np.unique(keys):
        idx = pending[keys == k].tolist()
        out.append([idx[i : i + batch] for i in range(0, len(idx), batch)])
    return out


def make_loader(dataset: TileDataset, batches: list[list[int]], *, workers: int, pin: bool) -> DataLoader:
    """A DataLoader yielding the given batches in order, read by ``workers`` processes."""
    kwargs = {}
    if workers > 0:
        kwargs = {
            "prefetch_factor": 4,
            "persistent_workers": False,
            "multiprocessing_context": "fork" if os.name == "posix" else None,
        }
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, pin_memory=pin, **kwargs)


def _collate(dataset: TileDataset, batch: list[int]):
    items = [dataset[i] for i in batch]
    return (
        torch.tensor([it[0] for it in items], dtype=torch.long),
        torch.stack([it[1] for it in items]),
        torch.tensor([it[2] for it in items], dtype=torch.bool),
        [it[3] for it in items],
    )


def thread_loader(dataset: TileDataset, batches: list[list[int]], *, threads: int = 1, prefetch: int = 2):
    """Yield collated batches ``(ids, images, ok, errors)`` read by background threads.

    OpenSlide and Pillow release the GIL while decoding, so threads overlap reading with the model
    without the inter-process copies and process overhead of DataLoader workers (measured on 2
    cores: worker processes cost 15 % of the throughput even with no decoding at all).
    """
    threads = max(1, threads)
    with ThreadPoolExecutor(threads, thread_name_prefix="tile-reader") as pool:
        pending = [pool.submit(_collate, dataset, b) for b in batches[: prefetch + threads]]
        nxt = len(pending)
        while pending:
            fut = pending.pop(0)
            if nxt < len(batches):
                pending.append(pool.submit(_collate, dataset, batches[nxt]))
                nxt += 1
            yield fut.result()


def tile_batches(dataset: TileDataset, batches: list[list[int]], *, reader: str, workers: int, pin: bool):
    """Batches of tiles by the chosen reader: ``"threads"`` (in-process, default on CPU) or
    ``"processes"`` (DataLoader workers, default on GPU where the CPU is free for decoding)."""
    if workers <= 0:  # in the calling thread, one batch after another
        return (_collate(dataset, b) for b in batches)
    if reader == "processes":
        return iter(make_loader(dataset, batches, workers=workers, pin=pin))
    return thread_loader(dataset, batches, threads=workers)
