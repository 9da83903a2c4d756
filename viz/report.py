"""HTML pages of the reports: Jinja2 templates around ``bokeh.embed.components``.

Pages open from disk without a server and without the internet: BokehJS is copied once into
``<report>/static/`` and every page loads it from there by a relative path (no CDN). Text that
reaches HTML goes through Jinja2's autoescaping or :func:`viz.explorer.escape`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = ["copy_bokeh_js", "render_page", "BOKEH_JS", "PAGE_CSS"]

#: BokehJS bundles the pages load (core, WebGL, widgets, tables)
BOKEH_JS = ("bokeh.min.js", "bokeh-gl.min.js", "bokeh-widgets.min.js", "bokeh-tables.min.js")

PAGE_CSS = """
body { font: 14px/1.4 -apple-system, "Segoe UI", Roboto, sans-serif; margin: 16px 24px; color: #222; }
nav { font-size: 13px; margin-bottom: 8px; } nav a { margin-right: 12px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #ddd; }
.wx-table { border-collapse: collapse; font-size: 12px; margin: 8px 0; }
.card { border: 1px solid #ccd; background: #f7f8fb; padding: 2px 12px; margin: 8px 0; max-width: 60em; }
.wx-table th, .wx-table td { border: 1px solid #ddd; padding: 3px 6px; text-align: left; vertical-align: top; }
.wx-table td.num { text-align: right; font-variant-numeric: tabular-nums; }
.flag { color: #b00020; font-weight: 600; } .muted { color: #777; }
.strip img { display: block; margin: 4px 0; max-width: 100%; }
.tiles img { margin: 2px; }
"""

_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{ title }}</title>
{% for js in scripts %}<script src="{{ static }}/{{ js }}"></script>
{% endfor %}<style>{{ css }}</style>
{{ bokeh_script | safe }}
</head>
<body>
<nav>{{ nav | safe }}</nav>
<h1>{{ title }}</h1>
{{ body | safe }}
</body>
</html>
"""


def copy_bokeh_js(static_dir: str | Path) -> list[str]:
    """Copy the BokehJS bundles of the installed Bokeh into ``static_dir`` (once)."""
    import bokeh

    src = Path(bokeh.__file__).parent / "server" / "static" / "js"
    dst = Path(static_dir)
    dst.mkdir(parents=True, exist_ok=True)
    for name in BOKEH_JS:
        if not (dst / name).exists() or (dst / name).stat().st_size != (src / name).stat().st_size:
            shutil.copyfile(src / name, dst / name)
    return list(BOKEH_JS)


def render_page(
    path: str | Path,
    *,
    title: str,
    body: str,
    plots: dict | None = None,
    static: str = "static",
    nav: str = "",
    css: str = "",
) -> Path:
    """Write one HTML page.

    Parameters
    ----------
    title : plain text (escaped).
    body : HTML, already escaped by the caller, with ``<!--plot:NAME-->`` markers where the Bokeh
        models of ``plots`` go.
    plots : NAME -> Bokeh model (embedded with ``bokeh.embed.components``).
    static : relative path from the page to the folder with the BokehJS bundles.
    """
    from jinja2 import Environment

    script = ""
    if plots:
        from bokeh.embed import components

        script, divs = components(plots)
        for name, div in divs.items():
            body = body.replace(f"<!--plot:{name}-->", div)
    env = Environment(autoescape=True)
    out = env.from_string(_TEMPLATE).render(
        title=title, scripts=BOKEH_JS, static=static, css=PAGE_CSS + css, bokeh_script=script, nav=nav, body=body
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(out, encoding="utf-8")
    tmp.replace(path)
    return path
