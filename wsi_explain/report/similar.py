""" "Find similar" in the served explorer: the nearest tiles of the cohort to the one selected.

The clustering stage saves a FAISS index of the reduced embeddings (``cohort/neighbours.faiss``,
rows in the order of ``cohort/tiles.parquet``, the explorer's data source rows). With a tile
selected (a click or a box in the UMAP, on the slide or in the gallery), the button selects that
tile and its ``k`` nearest neighbours across every slide, so the gallery shows them side by side;
a list names each neighbour with its slide, cluster and distance, and picking one there shows its
slide in the slide panel.
"""

from __future__ import annotations

import logging
from pathlib import Path

__all__ = ["INDEX_FILE", "similar_panel", "neighbour_rows"]

logger = logging.getLogger(__name__)

INDEX_FILE = "cohort/neighbours.faiss"


def neighbour_rows(index, row: int, *, k: int) -> tuple[list[int], list[float]]:
    """Tile ``row`` and its ``k`` nearest other rows (nearest first), with distances (0 for itself)."""
    idx, dist = index.similar([int(row)], k)
    keep = idx[0] >= 0
    return [int(row), *map(int, idx[0][keep])], [0.0, *map(float, dist[0][keep])]


def _describe(data: dict, rows: list[int], dists: list[float], names: dict) -> list[tuple[str, str]]:
    """Select options (value, label) for the neighbour list."""
    out = []
    for r, d in zip(rows, dists):
        c = int(data["cluster"][r])
        cname = names.get(c, "noise" if c < 0 else f"cluster {c}")
        label = f"{data['slide_id'][r]} · tile {int(data['tile_id'][r])} · {cname} · distance {d:.3f}"
        out.append((str(r), label))
    return out


def similar_panel(parts, run_path: Path, d: dict, *, k: int = 24):
    """The "Find similar" button, the neighbour list and a status line -> (row, status Div).
    ``d["names"]`` (cluster names, renamed as the naming panel saves) labels the neighbours.

    Without the index (a run clustered before it was saved) the button says so in the status.
    """
    from bokeh.layouts import column, row
    from bokeh.models import Button, Div, Select

    import viz
    from clustering import NeighbourIndex

    path = Path(run_path) / INDEX_FILE
    state: dict = {"index": None}
    button = Button(label=f"Find similar ({k} nearest)", name="find_similar")
    pick = Select(title="Neighbours (pick one to show its slide)", options=[], value="", name="neighbours", width=520)
    status = Div(text="", name="similar_status")

    def on_find():
        sel = list(parts.source.selected.indices)
        if not sel:
            status.text = "select a tile first (click it, or box it in the UMAP or on the slide)"
            return
        if state["index"] is None:
            try:
                state["index"] = NeighbourIndex(path)
            except (OSError, RuntimeError) as exc:
                logger.warning("%s: %s", path, exc)
                status.text = viz.escape(f"no neighbour index ({path.name}); cluster the run again to build it")
                return
        query = int(sel[0])
        rows, dists = neighbour_rows(state["index"], query, k=k)
        data = parts.source.data
        parts.source.selected.indices = rows
        pick.options = _describe(data, rows, dists, d.get("names", {}))
        pick.value = str(query)
        n_slides = len({data["slide_id"][r] for r in rows[1:]})
        status.text = viz.escape(
            f"tile {int(data['tile_id'][query])} of {data['slide_id'][query]} and its {len(rows) - 1} nearest "
            f"tiles from {n_slides} slide(s) are selected (the gallery shows them)"
        )

    def on_pick(attr, old, new):
        if new:
            sid = str(parts.source.data["slide_id"][int(new)])
            if sid in list(parts.slide_select.options):
                parts.slide_select.value = sid

    button.on_click(on_find)
    pick.on_change("value", on_pick)
    return row(column(Div(text=""), button), pick), status
