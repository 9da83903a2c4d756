"""Deep zoom for the explorer's slide panel (served explorer only: the tiles come from the server).

The slide panel draws, bottom to top: the tissue at the zoom the view needs (a Bokeh tile renderer
over the server's pyramid, down to level 0), the chosen method's heat map and the QC masks (tile
renderers of RGBA PNGs), then the cohort's tiles as coloured squares (the same glyphs as the
overview panel, so box selection and the links to the UMAP, gallery and table work at every zoom).
Each overlay has a visibility switch and an opacity slider. A scale bar in µm and a line with the
magnification follow the view; a second view of the same region without overlays can be shown
beside it (linked ranges).

Coordinates: x = level-0 px, y = minus level-0 px (Bokeh tile sources count y upwards), so the
slide's top-left corner is (0, 0) and its bottom-right (W, -H). The pyramid is the one of
:mod:`wsi_explain.io.deepzoom`: at zoom ``z`` one tile of ``tile_px`` px covers
``tile_px * 2 ** (zmax - z)`` level-0 px.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DeepZoomParts", "add_deep_zoom", "tile_source"]

_VIEW_JS = """
// the magnification line and the µm range of the scale bar follow the view
const s = slides[picker.value];
const mpp = s.mpp;
const w = fig.inner_width > 0 ? fig.inner_width : fig.width;
const spp = Math.max((xr.end - xr.start) / w, 1e-9);  // level-0 px per screen px
const z = Math.max(0, Math.min(zmax, Math.round(zmax - Math.log2(spp))));
status.text = s.problem ? `<p style="color:#a00">${s.problem}</p>` : "";
um.start = xr.start * (mpp || 1); um.end = xr.end * (mpp || 1);
bar.visible = mpp != null;
if (mpp != null) {
  const screen_mpp = mpp * spp;
  const x = (10 / screen_mpp).toFixed(1);
  mag.text = `<b>${x}x</b> (${screen_mpp.toFixed(2)} µm per screen px), pyramid zoom ${z} of ${zmax}`;
} else {
  mag.text = `${spp.toFixed(2)} level-0 px per screen px (the slide states no µm per px), pyramid zoom ${z} of ${zmax}`;
}
"""

_SLIDE_JS = """
// another slide: every tile source reads it (a change of extra_url_vars empties their caches)
for (const ts of sources) ts.extra_url_vars = Object.assign({}, ts.extra_url_vars, {slide: picker.value});
"""

_LAYERS_JS = """
const on = new Set(sel.active);
tiles_r.visible = on.has(0);
heat_r.visible = on.has(1);
qc_r.visible = on.has(2);
"""


@dataclass
class DeepZoomParts:
    """The deep-zoom models (for tests and server callbacks)."""

    controls: object
    raw_view: object
    tissue: object
    heat: object
    qc: object
    magnification: object


def tile_source(url: str, *, zmax: int, tile_px: int = 256, **url_vars: str):
    """A Bokeh WMTS tile source over the deep-zoom pyramid (``url`` with ``{X}``, ``{Y}``, ``{Z}``
    and the keys of ``url_vars`` in braces)."""
    from bokeh.models import WMTSTileSource

    return WMTSTileSource(
        url=url,
        tile_size=tile_px,
        min_zoom=0,
        max_zoom=int(zmax),
        initial_resolution=float(2**zmax),  # level-0 px per tile px at zoom 0
        x_origin_offset=0.0,
        y_origin_offset=float(tile_px * 2**zmax),  # the slide's top edge at y = 0
        wrap_around=False,
        snap_to_zoom=False,
        extra_url_vars=dict(url_vars),
        attribution="",
    )


def _raw_view(fig, spec: dict, sid: str, backend: str):
    """The same region without overlays (linked ranges), hidden until switched on."""
    from bokeh.models import WheelZoomTool
    from bokeh.plotting import figure

    raw = figure(
        title="Same region, no overlays",
        width=fig.width,
        height=fig.height,
        x_range=fig.x_range,
        y_range=fig.y_range,
        output_backend=backend,
        tools="pan,wheel_zoom,reset",
        match_aspect=True,
        name="dz_raw_view",
        visible=False,
    )
    raw.toolbar.active_scroll = raw.select_one(WheelZoomTool)
    ts = tile_source(spec["tissue_url"], zmax=spec["zmax"], tile_px=spec["tile_px"], slide=sid)
    raw.add_tile(ts, name="dz_raw_tissue", smoothing=True)
    raw.xaxis.visible = raw.yaxis.visible = False
    raw.grid.visible = False
    return raw, ts


def _overlay_controls(tiles_r, heat, qc, spec: dict, heat_ts):
    """Layer switches, opacity sliders and the heat map's method menu -> list of widgets."""
    from bokeh.models import CheckboxGroup, CustomJS, Select, Slider

    layers = CheckboxGroup(labels=["tile colours", "heat map", "QC: ink and blur"], active=[0], name="dz_layers")
    layers.js_on_change(
        "active", CustomJS(args=dict(sel=layers, tiles_r=tiles_r, heat_r=heat, qc_r=qc), code=_LAYERS_JS)
    )
    glyph = tiles_r.glyph
    s_tiles = Slider(
        title="tile colours opacity", start=0, end=1, step=0.05, value=glyph.fill_alpha, name="dz_alpha_tiles"
    )
    s_tiles.js_on_change(
        "value",
        CustomJS(
            args=dict(g=glyph), code="g.fill_alpha = cb_obj.value; g.line_alpha = Math.min(1, cb_obj.value + 0.3);"
        ),
    )
    s_heat = Slider(title="heat map opacity", start=0, end=1, step=0.05, value=heat.alpha, name="dz_alpha_heat")
    s_heat.js_link("value", heat, "alpha")
    s_qc = Slider(title="QC opacity", start=0, end=1, step=0.05, value=qc.alpha, name="dz_alpha_qc")
    s_qc.js_link("value", qc, "alpha")
    methods = list(spec["methods"]) or ["(none)"]
    method = Select(title="Heat map of", value=methods[0], options=methods, name="dz_method")
    method.js_on_change(
        "value",
        CustomJS(
            args=dict(ts=heat_ts),
            code="ts.extra_url_vars = Object.assign({}, ts.extra_url_vars, {method: cb_obj.value});",
        ),
    )
    return [layers, method, s_tiles, s_heat, s_qc]


def add_deep_zoom(
    fig, picker, tiles_r, slides: dict[str, dict], spec: dict, *, backend: str = "canvas"
) -> DeepZoomParts:
    """Put the deep-zoom layers under ``fig``'s tile glyphs and build their controls.

    Parameters
    ----------
    fig : the slide figure (x = level-0 px, y = minus level-0 px).
    picker : the slide Select (its value is the slide shown).
    tiles_r : the renderer of the tile squares (drawn above the tissue and overlays).
    slides : slide_id -> {"width", "height" (level-0 px), "mpp" (µm per level-0 px or None),
        "problem": HTML-escaped sentence shown above the controls when the slide cannot be read}.
    spec : {"zmax", "tile_px", "tissue_url", "heat_url", "qc_url" (URL templates with ``{slide}``,
        ``{method}``, ``{Z}``, ``{X}``, ``{Y}``), "methods": maps offered as heat maps}.
    """
    from bokeh.layouts import column, row
    from bokeh.models import CustomJS, Div, Metric, Range1d, ScaleBar, Toggle, WheelZoomTool

    sid = picker.value
    zmax, px = int(spec["zmax"]), int(spec["tile_px"])
    method = (list(spec["methods"]) or ["(none)"])[0]
    tissue_ts = tile_source(spec["tissue_url"], zmax=zmax, tile_px=px, slide=sid)
    heat_ts = tile_source(spec["heat_url"], zmax=zmax, tile_px=px, slide=sid, method=method)
    qc_ts = tile_source(spec["qc_url"], zmax=zmax, tile_px=px, slide=sid)
    tissue = fig.add_tile(tissue_ts, name="dz_tissue", smoothing=True)
    heat = fig.add_tile(heat_ts, name="dz_heat", alpha=0.5, visible=False, smoothing=True)
    qc = fig.add_tile(qc_ts, name="dz_qc", alpha=0.7, visible=False, smoothing=False)
    fig.renderers = [tissue, heat, qc] + [r for r in fig.renderers if r not in (tissue, heat, qc)]
    fig.toolbar.active_scroll = fig.select_one(WheelZoomTool)
    fig.grid.visible = False

    um = Range1d(0, 1)
    bar = ScaleBar(range=um, unit="µm", dimensional=Metric(base_unit="m"), location="bottom_left", name="dz_scale_bar")
    bar.bar_length = 0.25
    fig.add_layout(bar)
    mag = Div(text=f"pyramid zoom 0 of {zmax}", name="dz_magnification", width=560)
    raw, raw_ts = _raw_view(fig, spec, sid, backend)
    info = {
        k: {"mpp": v.get("mpp"), "width": v["width"], "height": v["height"], "problem": v.get("problem") or ""}
        for k, v in slides.items()
    }
    first = info[sid]["problem"]
    status = Div(text=f'<p style="color:#a00">{first}</p>' if first else "", name="dz_status", width=560)
    view = CustomJS(
        args=dict(
            slides=info, picker=picker, fig=fig, xr=fig.x_range, um=um, bar=bar, mag=mag, zmax=zmax, status=status
        ),
        code=_VIEW_JS,
    )
    for attr in ("start", "end"):
        fig.x_range.js_on_change(attr, view)
    picker.js_on_change(
        "value", CustomJS(args=dict(sources=[tissue_ts, heat_ts, qc_ts, raw_ts], picker=picker), code=_SLIDE_JS)
    )
    picker.js_on_change("value", view)
    side = Toggle(label="Raw tissue side by side", active=False, name="dz_side")
    side.js_link("active", raw, "visible")
    widgets = _overlay_controls(tiles_r, heat, qc, spec, heat_ts)
    controls = column(status, row(widgets[0], widgets[1], column(*widgets[2:])), row(side, mag))
    return DeepZoomParts(controls, raw, tissue, heat, qc, mag)
