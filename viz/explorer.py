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
for (const i of idx) {
  const p = d.prob_pos ? Number(d.prob_pos[i]).toFixed(2) : '';
  const title = esc(`${d.slide_id[i]} tile ${d.tile_id[i]} | ${d.cname[i]} | p=${p}`);
  if (has_col && !d[has_col][i]) {
    out += `<div class="wx-missing" title="${title}">${esc(d.cname[i])}<br>(no image in this report)</div>`;
  } else {
    out += `<a href="${fill(full_tpl, i)}" target="_blank" rel="noopener"><img loading="lazy" src="${fill(thumb_tpl, i)}" title="${title}" alt="${title}"></a>`;
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
xr.start = 0; xr.end = s.width; yr.start = s.height; yr.end = 0;
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


def _source_data(tiles: pd.DataFrame, colour_by: dict[str, str], names: dict[int, str], extra: tuple[str, ...]):
    d = {
        "umap_x": tiles["umap_x"].to_numpy(np.float32),
        "umap_y": tiles["umap_y"].to_numpy(np.float32),
        "slide_id": tiles["slide_id"].astype(str).to_numpy(object),
        "tile_id": tiles["tile_id"].to_numpy(np.int64),
        "cluster": tiles["cluster"].to_numpy(np.int64),
        "xc": (tiles["x"] + tiles["size0"] / 2).to_numpy(np.float64),
        "yc": (tiles["y"] + tiles["size0"] / 2).to_numpy(np.float64),
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
) -> ExplorerParts:
    """Build the linked explorer.

    Parameters
    ----------
    tiles : DataFrame, one row per tile: slide_id, tile_id, x, y, size0 (level-0 px), umap_x,
        umap_y, cluster, prob_pos and the columns named in ``colour_by``/``sort_by``; not modified.
    clusters : DataFrame, one row per cluster: cluster and the columns of ``table_columns``.
    slides : slide_id -> {"url": thumbnail URL, "width", "height": level-0 size in px}.
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
    """
    from bokeh.layouts import column, row
    from bokeh.models import (
        BoxSelectTool,
        CDSView,
        ColumnDataSource,
        CustomJS,
        DataTable,
        Div,
        GroupFilter,
        HoverTool,
        HTMLTemplateFormatter,
        InlineStyleSheet,
        LassoSelectTool,
        NumberFormatter,
        Range1d,
        Select,
        TableColumn,
    )
    from bokeh.plotting import figure

    names = names or {}
    sort_by = sort_by or {"membership": "membership"}
    extra = tuple(set(sort_by.values()) | {"prob_pos"} | ({has_thumb} if has_thumb else set()))
    data, colour_cols = _source_data(tiles, colour_by, names, extra)
    first_colour = next(iter(colour_cols.values()))
    data["colour"] = data[first_colour]
    source = ColumnDataSource(data, name="tiles")
    backend = "webgl" if webgl else "canvas"

    tooltip = ('<div style="font:11px sans-serif">@slide_id tile @tile_id<br>@cname, p=@prob_pos{0.00}</div>'
               if "prob_pos" in data else '<div style="font:11px sans-serif">@slide_id tile @tile_id<br>@cname</div>')
    if hover_img:  # Bokeh fills @fields in the tooltip's HTML
        tooltip = f'<div><img src="{hover_img}" width="96" height="96"></div>' + tooltip
    umap = figure(title="UMAP of the cohort's tiles", width=560, height=520, output_backend=backend,
                  tools="pan,wheel_zoom,reset,save", name="umap")
    lasso, box = LassoSelectTool(), BoxSelectTool()
    umap.add_tools(lasso, box, HoverTool(tooltips=tooltip))
    umap.toolbar.active_drag = box
    umap.scatter("umap_x", "umap_y", source=source, size=4, fill_color="colour", line_color="colour",
                          fill_alpha=0.8, line_alpha=0.8, name="umap_points")
    umap.xaxis.visible = umap.yaxis.visible = False

    sids = sorted(slides)
    s0 = slides[sids[0]]
    img_src = ColumnDataSource({"url": [s0["url"]], "x": [0], "y": [0], "w": [s0["width"]], "h": [s0["height"]]})
    xr, yr = Range1d(0, s0["width"]), Range1d(s0["height"], 0)
    slide = figure(title="Slide", width=560, height=520, x_range=xr, y_range=yr, output_backend=backend,
                   tools="pan,wheel_zoom,reset,save", match_aspect=True, name="slide")
    slide.image_url(url="url", x="x", y="y", w="w", h="h", anchor="top_left", source=img_src)
    group = GroupFilter(column_name="slide_id", group=sids[0])
    r_slide = slide.rect("xc", "yc", "size0", "size0", source=source, view=CDSView(filter=group),
                         fill_color="colour", line_color="colour", fill_alpha=0.45,
                         line_alpha=0.8, name="slide_tiles")
    sbox = BoxSelectTool(renderers=[r_slide])
    slide.add_tools(sbox, HoverTool(renderers=[r_slide], tooltips=tooltip))
    slide.toolbar.active_drag = sbox
    slide.xaxis.visible = slide.yaxis.visible = False

    colour_select = Select(title="Colour by", value=next(iter(colour_cols)), options=list(colour_cols), name="colour_by")
    colour_select.js_on_change("value", CustomJS(args=dict(colour_cols=colour_cols, source=source, sel=colour_select),
                                                 code=_COLOUR_JS))
    slide_select = Select(title="Slide", value=sids[0], options=sids, name="slide_picker")
    slide_select.js_on_change("value", CustomJS(args=dict(slides={k: slides[k] for k in sids}, filter=group, img=img_src,
                                                          xr=xr, yr=yr, sel=slide_select, source=source), code=_SLIDE_JS))

    gallery = Div(text='<div class="wx-head">Select tiles in the UMAP or on the slide to see them here.</div>',
                  width=1120, name="gallery", stylesheets=[InlineStyleSheet(css=GALLERY_CSS)])  # Divs live in a shadow DOM
    method_select = Select(title="Overlay", value=methods[0] if methods else "", options=list(methods) or [""], name="method")
    sort_select = Select(title="Sort gallery by", value=next(iter(sort_by)), options=list(sort_by), name="sort_by")
    gal_cb = CustomJS(args=dict(source=source, gallery=gallery, method_sel=method_select, sort_sel=sort_select,
                                sort_cols=sort_by, thumb_tpl=thumb_template, full_tpl=full_template,
                                has_col=has_thumb or "", maxn=max_gallery), code=_GALLERY_JS)
    source.selected.js_on_change("indices", gal_cb)
    method_select.js_on_change("value", gal_cb)
    sort_select.js_on_change("value", gal_cb)

    table_columns = table_columns or {"size": "size"}
    cdata = {"cluster": clusters["cluster"].to_numpy(np.int64)}
    cdata["swatch"] = colour_column(clusters["cluster"].to_numpy(np.int64))
    cdata["name"] = np.array([names.get(int(c), "noise" if c < 0 else f"cluster {c}") for c in cdata["cluster"]], object)
    for title, col in table_columns.items():
        v = clusters[col]
        if pd.api.types.is_integer_dtype(v):
            cdata[col] = v.to_numpy(np.int64)
        elif pd.api.types.is_numeric_dtype(v):
            cdata[col] = v.to_numpy(np.float64)
        else:
            cdata[col] = v.astype(str).to_numpy(object)
    csource = ColumnDataSource(cdata, name="clusters")
    swatch = HTMLTemplateFormatter(template='<span style="display:inline-block;width:14px;height:14px;background:<%= value %>"></span>')
    tcols = [TableColumn(field="swatch", title="", width=24, formatter=swatch, sortable=False),
             TableColumn(field="cluster", title="cluster", width=60), TableColumn(field="name", title="name", width=160)]
    tcols += [TableColumn(field=col, title=title, formatter=NumberFormatter(format="0.000") if cdata[col].dtype.kind == "f" else None)
              if cdata[col].dtype.kind == "f" else TableColumn(field=col, title=title) for title, col in table_columns.items()]
    table = DataTable(source=csource, columns=tcols, width=1120, height=min(300, 30 + 26 * len(clusters)), sortable=True,
                      reorderable=False, index_position=None, name="cluster_table")
    csource.selected.js_on_change("indices", CustomJS(args=dict(csource=csource, source=source), code=_TABLE_JS))

    controls = row(colour_select, slide_select, method_select, sort_select)
    layout = column(controls, row(umap, slide), table, gallery)
    return ExplorerParts(layout, source, csource, umap, slide, gallery, table, colour_select, slide_select, method_select, sort_select)


def escape(text) -> str:
    """HTML-escape any text that reaches a page (slide names, labels, user comments)."""
    return html.escape(str(text), quote=True)


def js_string(obj) -> str:
    """JSON for inline <script> blocks, safe against ``</script>`` injection."""
    return json.dumps(obj).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
