"""Report pages from Jinja2 templates (``wsi_explain/report/templates/``), autoescaped.

Every value a template prints is escaped by Jinja2, so a slide id, site, label, cluster name or
comment can never become markup. The only HTML that passes unescaped is what this module marks as
such: Bokeh's own ``components`` output and the tables of :mod:`viz.plots`, which escape every
cell themselves (:func:`fragment`). Pages load BokehJS from ``<report>/static`` (no CDN) and are
written atomically.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

__all__ = ["render", "fragment", "environment"]


@cache
def environment():
    """The Jinja2 environment of the report templates: autoescape on for every template (also
    strings), undefined names raise, block tags leave no blank lines."""
    from jinja2 import Environment, PackageLoader, StrictUndefined

    return Environment(
        loader=PackageLoader("wsi_explain.report", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def fragment(html: str | None):
    """Mark HTML built by a function that escapes its own text (``viz.table_html``,
    ``viz.metric_table_html``) as safe for the templates; None stays None."""
    from markupsafe import Markup

    return None if html is None else Markup(html)


def render(
    path: str | Path,
    template: str,
    *,
    title: str,
    plots: dict | None = None,
    static: str = "static",
    home: str | None = None,
    css: str = "",
    **context,
) -> Path:
    """Render ``template`` with ``context`` to ``path`` (atomically) and return ``path``.

    Parameters
    ----------
    path : where the page goes; parents are created.
    template : a file name in ``templates/`` (``index.html``, ``cluster.html``, ``slide.html``).
    title : plain text (escaped) for ``<title>`` and the heading.
    plots : NAME -> Bokeh model; each is embedded with ``bokeh.embed.components`` and available to
        the template as ``plots.NAME``.
    static : relative URL of the folder with the BokehJS bundles, seen from the page.
    home : relative URL prefix of the cohort index for the navigation link (None: no link).
    css : extra CSS (ours, not user text) after :data:`viz.PAGE_CSS`.
    context : the template's variables; strings are escaped when printed.
    """
    from markupsafe import Markup

    import viz

    script, divs = "", {}
    if plots:
        from bokeh.embed import components

        script, divs = components(plots)
    html = (
        environment()
        .get_template(template)
        .render(
            title=title,
            scripts=viz.BOKEH_JS,
            static=static,
            css=Markup(viz.PAGE_CSS + css),
            bokeh_script=Markup(script),
            plots={k: Markup(v) for k, v in divs.items()},
            home=home,
            **context,
        )
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(path)
    return path
