"""The linked explorer: UMAP scatter <-> slide panel <-> gallery <-> cluster table.

One Bokeh layout serves both the server app (``wsi-explain serve``) and the standalone cohort
report. The UMAP scatter and the slide panel draw the *same* ColumnDataSource, so a lasso in one
selects the same tiles in the other; the gallery and the cluster table are wired with CustomJS,
so the links also work in a static HTML file without a server.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .colours import colour_column

__all__ = ["ExplorerParts", "explorer_layout", "GALLERY_CSS"]

#: CSS of the gallery (put in the page's <style>)
GALLERY_CSS = """
.wx-gallery { display: flex; flex-wrap: wrap; gap: 4px; max-height: 520px; overflow-y: auto; }
.wx-gallery img, .wx-gallery .wx-missing { width: 96px; height: 96px; border: 1px solid #ccc; }
.wx-gallery .wx-missing { font: 10px sans-serif; color: #777; display: flex; align-items: center; justify-content: center; text-align: center; }
.wx-head { font: 13px sans-serif; margin: 4px 0; }
"""

_GALLERY_JS = """
const d = source.data;
let idx = source.selected.indices.slice();
const col = sort_cols[sort_sel.value];
if (col && d[col]) idx.sort((a, b) => (Number.isFinite(d[col][b]) ? d[col][b] : -1e30) - (Number.isFinite(d[col][a]) ? d[col][a] : -1e30));
if (has_col) idx.sort((a, b) => (d[has_col][b] ? 1 : 0) - (d[has_col][a] ? 1 : 0));  // tiles with an image first
const n = idx.length;
idx = idx.slice(0, maxn);
const m = method_sel.value;
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;'}[c]));
const fill = (tpl, i) => tpl.split('{slide}').join(encodeURIComponent(d.slide_id[i])).split('{tile}').join(String(d.tile_id[i])).split('{method}').join(encodeURIComponent(m));
let out = `<div class="wx-head">${n} tile${n == 1 ? '' : 's'} selected` + (n > maxn ? `, the first ${maxn} by ${esc(sort_sel.value)} shown` : '') + '</div><div class="wx-gallery">';
// each tile framed in its colour of the "Colour by" menu (uncertainty, error, cluster...)
const ckey = colour_sel ? colour_sel.value : '';
for (const i of idx) {
  const p = d.prob_pos ? Number(d.prob_pos[i]).toFixed(2) : '';
  const title = esc(`${d.slide_id[i]} tile ${d.tile_id[i]} | ${d.cname[i]} | p=${p}` + (ckey ? ` | frame: ${ckey}` : ''));
  const frame = d.colour ? ` style="border: 3px solid ${esc(d.colour[i])}"` : '';
  if (has_col && !d[has_col][i]) {
    out += `<div class="wx-missing" title="${title}"${frame}>${esc(d.cname[i])}<br>(no image in this report)</div>`;
  } else {
    out += `<a href="${fill(full_tpl, i)}" target="_blank" rel="noopener"><img loading="lazy" src="${fill(thumb_tpl, i)}" title="${title}" alt="${title}"${frame}></a>`;
  }
}
gallery.text = out + '</div>';
"""

_COLOUR_JS = """
// swap the data column both renderers draw (a data change re-uploads WebGL buffers; a glyph
// property change alone does not repaint the WebGL scatter)
// (in place, then change.emit: no copy of the whole table goes back to a server)
const c = colour_cols[sel.value];
source.data.colour = source.data[c];
source.change.emit();
"""

_TABLE_JS = """
const sel = csource.selected.indices;
if (!sel.length) return;
const wanted = new Set(sel.map((i) => csource.data.cluster[i]));
const c = source.data.cluster;
const idx = [];
for (let i = 0; i < c.length; i++) if (wanted.has(c[i])) idx.push(i);
source.selected.indices = idx;
"""

_SLIDE_JS = """
const s = slides[sel.value];
filter.group = sel.value;
img.data = {url: [s.url], x: [0], y: [0], w: [s.width], h: [s.height]};
xr.start = 0; xr.end = s.width; yr.start = -s.height; yr.end = 0;
source.change.emit();
"""


@dataclass
class ExplorerParts:
    """The models of the explorer, for servers that add Python callbacks."""

    layout: object
    source: object
    cluster_source: object
    umap: object
    slide: object
    gallery: object
    table: object
    colour_select: object
    slide_select: object
    method_select: object
    sort_select: object
    zoom: object = None  #: viz.deepzoom.DeepZoomParts of a served explorer


def _source_data(tiles: pd.DataFrame, colour_by: dict[str, str], names: dict[int, str], extra: tuple[str, ...]):
    d = {
        "umap_x": tiles["umap_x"].to_numpy(np.float32),
        "umap_y": tiles["umap_y"].to_numpy(np.float32),
        "slide_id": tiles["slide_id"].astype(str).to_numpy(object),
        "tile_id": tiles["tile_id"].to_numpy(np.int64),
        "cluster": tiles["cluster"].to_numpy(np.int64),
        "xc": (tiles["x"] + tiles["size0"] / 2).to_numpy(np.float64),
        "yc": -(tiles["y"] + tiles["size0"] / 2).to_numpy(np.float64),  # y counts upwards (tile sources)
        "size0": tiles["size0"].to_numpy(np.float64),
    }
    d["cname"] = np.array([names.get(int(c), "noise" if c < 0 else f"cluster {c}") for c in d["cluster"]], object)
    cols = {}
    for i, (label, col) in enumerate(colour_by.items()):
        key = f"c_{i}"
        d[key] = colour_column(tiles[col].to_numpy())
        cols[label] = key
    for c in extra:
        if c in tiles.columns and c not in d:
            v = tiles[c]
            d[c] = v.to_numpy(np.float64) if pd.api.types.is_numeric_dtype(v) else v.astype(str).to_numpy(object)
    return d, cols


def explorer_layout(
    tiles: pd.DataFrame,
    clusters: pd.DataFrame,
    *,
    slides: dict[str, dict],
    colour_by: dict[str, str],
    thumb_template: str,
    full_template: str,
    methods: list[str],
    names: dict[int, str] | None = None,
    sort_by: dict[str, str] | None = None,
    has_thumb: str | None = None,
    hover_img: str | None = None,
    table_columns: dict[str, str] | None = None,
    max_gallery: int = 48,
    webgl: bool = True,
    deep_zoom: dict | None = None,
) -> ExplorerParts:
    """Build the linked explorer.

    Parameters
    ----------
    tiles : DataFrame, one row per tile: slide_id, tile_id, x, y, size0 (level-0 px), umap_x,
        umap_y, cluster, prob_pos and the columns named in ``colour_by``/``sort_by``; not modified.
    clusters : DataFrame, one row per cluster: cluster and the columns of ``table_columns``.
    slides : slide_id -> {"url": thumbnail URL, "width", "height": level-0 size in px}. The slide
        panel's y axis counts upwards: a tile at level-0 row ``y`` is drawn at ``-y``.
    colour_by : menu label -> tiles column (categorical or continuous).
    thumb_template, full_template : URLs with ``{slide}``, ``{tile}``, ``{method}``: the gallery
        thumbnail (tile with the method's overlay) and the full-resolution view it links to.
    methods : attribution methods offered in the gallery.
    names : cluster -> pathologist's name.
    sort_by : menu label -> column the gallery sorts by (descending).
    has_thumb : bool column: tiles without an image (static reports) show a placeholder.
    hover_img : URL of the hover image with Bokeh ``@field`` placeholders (e.g.
        ``/tiles/@slide_id/@tile_id.png?size=96``); default: text only.
    table_columns : cluster-table column title -> clusters column.
    deep_zoom : the served pyramid (see :func:`viz.deepzoom.add_deep_zoom`; ``slides`` then also
        give each slide's "mpp"); default: the overview image.
    """
    from bokeh.layouts import column, row
    from bokeh.models import ColumnDataSource

    names = names or {}
    sort_by = sort_by or {"membership": "membership"}
    extra = tuple(set(sort_by.values()) | {"prob_pos"} | ({has_thumb} if has_thumb else set()))
    data, colour_cols = _source_data(tiles, colour_by, names, extra)
    data["colour"] = data[next(iter(colour_cols.values()))]
    source = ColumnDataSource(data, name="tiles")
    backend = "webgl" if webgl else "canvas"
    tooltip = _tooltip("prob_pos" in data, hover_img)
    umap = _umap_figure(source, tooltip, backend)
    slide, slide_select, zoom = _slide_view(source, slides, tooltip, backend, deep_zoom)
    colour_select = _colour_menu(source, colour_cols)
    gallery, method_select, sort_select = _gallery(
        source,
        methods=methods,
        sort_by=sort_by,
        thumb_template=thumb_template,
        full_template=full_template,
        has_thumb=has_thumb,
        max_gallery=max_gallery,
        colour_select=colour_select,
    )
    csource, table = _cluster_table(clusters, source, names, table_columns or {"size": "size"})
    controls = row(colour_select, slide_select, method_select, sort_select)
    if zoom is None:
        layout = column(controls, row(umap, slide), table, gallery)
    else:
        layout = column(controls, row(umap, slide, zoom.raw_view), zoom.controls, table, gallery)
    return ExplorerParts(
        layout,
        source,
        csource,
        umap,
        slide,
        gallery,
        table,
        colour_select,
        slide_select,
        method_select,
        sort_select,
        zoom,
    )


def _tooltip(has_prob: bool, hover_img: str | None) -> str:
    """The hover tooltip's HTML (Bokeh fills the @fields)."""
    text = "@slide_id tile @tile_id<br>@cname" + (", p=@prob_pos{0.00}" if has_prob else "")
    tooltip = f'<div style="font:11px sans-serif">{text}</div>'
    if hover_img:
        tooltip = f'<div><img src="{hover_img}" width="96" height="96"></div>' + tooltip
    return tooltip


def _umap_figure(source, tooltip: str, backend: str):
    """The UMAP scatter of every tile, with lasso and box selection."""
    from bokeh.models import BoxSelectTool, HoverTool, LassoSelectTool
    from bokeh.plotting import figure

    umap = figure(
        title="UMAP of the cohort's tiles",
        width=560,
        height=520,
        output_backend=backend,
        tools="pan,wheel_zoom,reset,save",
        name="umap",
    )
    box = BoxSelectTool()
    umap.add_tools(LassoSelectTool(), box, HoverTool(tooltips=tooltip))
    umap.toolbar.active_drag = box
    umap.scatter(
        "umap_x",
        "umap_y",
        source=source,
        size=4,
        fill_color="colour",
        line_color="colour",
        fill_alpha=0.8,
        line_alpha=0.8,
        name="umap_points",
    )
    umap.xaxis.visible = umap.yaxis.visible = False
    return umap


def _slide_view(source, slides: dict[str, dict], tooltip: str, backend: str, deep_zoom: dict | None = None):
    """The slide panel (the overview image, or the deep-zoom pyramid when ``deep_zoom`` is given,
    under the slide's tiles as squares in level-0 px with box selection) and the slide picker that
    swaps image, ranges and tile filter -> (figure, Select, DeepZoomParts or None)."""
    from bokeh.models import BoxSelectTool, CDSView, ColumnDataSource, CustomJS, GroupFilter, HoverTool, Range1d, Select
    from bokeh.plotting import figure

    sids = sorted(slides)
    s0 = slides[sids[0]]
    img_src = ColumnDataSource({"url": [s0["url"]], "x": [0], "y": [0], "w": [s0["width"]], "h": [s0["height"]]})
    xr, yr = Range1d(0, s0["width"]), Range1d(-s0["height"], 0)
    slide = figure(
        title="Slide",
        width=560,
        height=520,
        x_range=xr,
        y_range=yr,
        output_backend=backend,
        tools="pan,wheel_zoom,reset,save",
        match_aspect=True,
        name="slide",
    )
    if deep_zoom is None:
        slide.image_url(url="url", x="x", y="y", w="w", h="h", anchor="top_left", source=img_src)
    group = GroupFilter(column_name="slide_id", group=sids[0])
    r_slide = slide.rect(
        "xc",
        "yc",
        "size0",
        "size0",
        source=source,
        view=CDSView(filter=group),
        fill_color="colour",
        line_color="colour",
        fill_alpha=0.45 if deep_zoom is None else 0.3,
        line_alpha=0.8,
        name="slide_tiles",
    )
    sbox = BoxSelectTool(renderers=[r_slide])
    slide.add_tools(sbox, HoverTool(renderers=[r_slide], tooltips=tooltip))
    slide.toolbar.active_drag = sbox
    slide.xaxis.visible = slide.yaxis.visible = False
    picker = Select(title="Slide", value=sids[0], options=sids, name="slide_picker")
    args = dict(slides={k: slides[k] for k in sids}, filter=group, img=img_src, xr=xr, yr=yr, sel=picker, source=source)
    picker.js_on_change("value", CustomJS(args=args, code=_SLIDE_JS))
    zoom = None
    if deep_zoom is not None:
        from .deepzoom import add_deep_zoom

        zoom = add_deep_zoom(slide, picker, r_slide, slides, deep_zoom, backend=backend)
    return slide, picker, zoom


def _colour_menu(source, colour_cols: dict[str, str]):
    """The "Colour by" menu: swaps the source's colour column in the browser."""
    from bokeh.models import CustomJS, Select

    sel = Select(title="Colour by", value=next(iter(colour_cols)), options=list(colour_cols), name="colour_by")
    sel.js_on_change("value", CustomJS(args=dict(colour_cols=colour_cols, source=source, sel=sel), code=_COLOUR_JS))
    return sel


def _gallery(source, *, methods, sort_by, thumb_template, full_template, has_thumb, max_gallery, colour_select=None):
    """The gallery of selected tiles with its overlay and sort menus -> (Div, Select, Select); each
    tile is framed in its colour of ``colour_select`` (redrawn when that menu changes)."""
    from bokeh.models import CustomJS, Div, InlineStyleSheet, Select

    gallery = Div(
        text='<div class="wx-head">Select tiles in the UMAP or on the slide to see them here.</div>',
        width=1120,
        name="gallery",
        stylesheets=[InlineStyleSheet(css=GALLERY_CSS)],
    )  # Divs live in a shadow DOM
    method_select = Select(
        title="Overlay", value=methods[0] if methods else "", options=list(methods) or [""], name="method"
    )
    sort_select = Select(title="Sort gallery by", value=next(iter(sort_by)), options=list(sort_by), name="sort_by")
    args = dict(
        source=source,
        gallery=gallery,
        method_sel=method_select,
        sort_sel=sort_select,
        sort_cols=sort_by,
        thumb_tpl=thumb_template,
        full_tpl=full_template,
        has_col=has_thumb or "",
        maxn=max_gallery,
        colour_sel=colour_select,
    )
    gal_cb = CustomJS(args=args, code=_GALLERY_JS)
    source.selected.js_on_change("indices", gal_cb)
    method_select.js_on_change("value", gal_cb)
    sort_select.js_on_change("value", gal_cb)
    if colour_select is not None:  # after the colour menu's own callback, which swaps the colours
        colour_select.js_on_change("value", gal_cb)
    return gallery, method_select, sort_select


def _cluster_columns(clusters: pd.DataFrame, names: dict[int, str], table_columns: dict[str, str]) -> dict:
    """The cluster table's data: cluster, colour swatch, name and the named columns."""
    cdata = {"cluster": clusters["cluster"].to_numpy(np.int64)}
    cdata["swatch"] = colour_column(clusters["cluster"].to_numpy(np.int64))
    cdata["name"] = np.array(
        [names.get(int(c), "noise" if c < 0 else f"cluster {c}") for c in cdata["cluster"]], object
    )
    for col in table_columns.values():
        v = clusters[col]
        if pd.api.types.is_integer_dtype(v):
            cdata[col] = v.to_numpy(np.int64)
        elif pd.api.types.is_numeric_dtype(v):
            cdata[col] = v.to_numpy(np.float64)
        else:
            cdata[col] = v.astype(str).to_numpy(object)
    return cdata


def _cluster_table(clusters: pd.DataFrame, source, names: dict[int, str], table_columns: dict[str, str]):
    """The sortable cluster table; clicking a row selects the cluster's tiles -> (source, DataTable)."""
    from bokeh.models import ColumnDataSource, CustomJS, DataTable, HTMLTemplateFormatter, NumberFormatter, TableColumn

    cdata = _cluster_columns(clusters, names, table_columns)
    csource = ColumnDataSource(cdata, name="clusters")
    swatch = HTMLTemplateFormatter(
        template='<span style="display:inline-block;width:14px;height:14px;background:<%= value %>"></span>'
    )
    tcols = [
        TableColumn(field="swatch", title="", width=24, formatter=swatch, sortable=False),
        TableColumn(field="cluster", title="cluster", width=60),
        TableColumn(field="name", title="name", width=160),
    ]
    for title, col in table_columns.items():
        fmt = NumberFormatter(format="0.000") if cdata[col].dtype.kind == "f" else None
        tcols.append(TableColumn(field=col, title=title, formatter=fmt) if fmt else TableColumn(field=col, title=title))
    table = DataTable(
        source=csource,
        columns=tcols,
        width=1120,
        height=min(300, 30 + 26 * len(clusters)),
        sortable=True,
        reorderable=False,
        index_position=None,
        name="cluster_table",
    )
    csource.selected.js_on_change("indices", CustomJS(args=dict(csource=csource, source=source), code=_TABLE_JS))
    return csource, table


def escape(text) -> str:
    """HTML-escape any text that reaches a page (slide names, labels, user comments)."""
    return html.escape(str(text), quote=True)


def js_string(obj) -> str:
    """JSON for inline <script> blocks, safe against ``</script>`` injection."""
    return json.dumps(obj).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
