"""Small Bokeh plots and HTML tables of the report: metrics with intervals, ensemble spread,
randomisation curves, cluster removal."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .colours import categorical_colours
from .explorer import escape

__all__ = ["metric_table_html", "spread_plot", "sanity_plot", "removal_plot", "table_html"]


def table_html(df: pd.DataFrame, *, float_fmt: str = "{:.3g}", classes: str = "wx-table") -> str:
    """A plain HTML table of a DataFrame with every cell escaped."""
    head = "".join(f"<th>{escape(c)}</th>" for c in df.columns)
    rows = []
    for _, r in df.iterrows():
        cells = []
        for v in r.to_numpy():
            if isinstance(v, (float, np.floating)):
                cells.append("<td class='num'>" + ("" if np.isnan(v) else escape(float_fmt.format(v))) + "</td>")
            else:
                cells.append(f"<td>{escape(v)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table class='{classes}'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def metric_table_html(metrics: pd.DataFrame, *, cluster: int, names: dict | None = None, info=None) -> str:
    """Metrics of one cluster: one row per metric, one column per method, ``value [low, high] (n)``;
    with ``info`` (metric -> (better, meaning): "higher"/"lower"/"" and one line) a "better" column
    after the metric's name and a "meaning" column last."""
    sub = metrics[metrics["cluster"] == cluster]
    if sub.empty:
        return "<p>No metric for this cluster.</p>"

    def cell(r):
        if np.isnan(r["ci_low"]):
            return f"{r['value']:.3g} (n={r['n_tiles']})"
        return f"{r['value']:.3g} [{r['ci_low']:.3g}, {r['ci_high']:.3g}] (n={r['n_tiles']})"

    piv = sub.assign(text=sub.apply(cell, axis=1)).pivot_table(
        index="metric", columns="method", values="text", aggfunc="first"
    )
    piv = piv.reset_index().fillna("")
    if info is not None:
        about = [info(m) for m in piv["metric"]]
        piv.insert(1, "better", [a[0] for a in about])
        piv["meaning"] = [a[1] for a in about]
    return table_html(piv)


def spread_plot(points: pd.DataFrame, fits: dict, *, method: str, title: str):
    """Ensemble spread (Koriakina et al.): std of attention vs mean accuracy (quadratic fit) and
    vs std of accuracy (linear fit), one point per cluster."""
    from bokeh.layouts import row
    from bokeh.models import ColumnDataSource, HoverTool
    from bokeh.plotting import figure

    figs = []
    for xcol, key, label in (
        ("acc_mean", "attn_std~acc_mean", "mean accuracy"),
        ("acc_std", "attn_std~acc_std", "std of accuracy"),
    ):
        src = ColumnDataSource(points[["cluster", xcol, "attn_std", "size"]].rename(columns={xcol: "x"}))
        f = figure(
            width=360,
            height=300,
            title=f"{title}: attention spread vs {label}",
            x_axis_label=label,
            y_axis_label=f"std of {method} attention",
            tools="pan,wheel_zoom,reset,save",
        )
        f.scatter("x", "attn_std", source=src, size=8, alpha=0.7)
        f.add_tools(HoverTool(tooltips=[("cluster", "@cluster"), ("tiles", "@size")]))
        fit = fits.get(key, {})
        if fit.get("coef"):
            xs = np.linspace(np.nanmin(points[xcol]), np.nanmax(points[xcol]), 50)
            f.line(
                xs,
                np.polyval(fit["coef"], xs),
                color="firebrick",
                line_width=2,
                legend_label=f"fit R² = {fit['r2']:.2f}" if np.isfinite(fit["r2"]) else "fit",
            )
        figs.append(f)
    return row(*figs)


def sanity_plot(sanity: pd.DataFrame, *, cohort_row: int = -2):
    """Cascading randomisation: mean Spearman and SSIM vs randomised blocks, one line per method."""
    from bokeh.layouts import row
    from bokeh.plotting import figure

    coh = sanity[sanity["cluster"] == cohort_row]
    methods = sorted(coh["method"].unique())
    colours, _ = categorical_colours(pd.Series(methods))
    blocks = list(coh.sort_values("step").drop_duplicates("step")["block"])
    figs = []
    for metric in ("spearman", "ssim"):
        f = figure(
            width=420,
            height=300,
            title=f"{metric} with the original maps",
            x_range=blocks,
            x_axis_label="blocks randomised (cumulative, from the output)",
            tools="save",
        )
        for m, c in zip(methods, colours):
            g = coh[coh["method"] == m].sort_values("step")
            f.line(g["block"].tolist(), g[metric].to_numpy(), color=c, line_width=2, legend_label=m)
            f.scatter(g["block"].tolist(), g[metric].to_numpy(), color=c, size=6)
        f.xaxis.major_label_orientation = 0.8
        figs.append(f)
    return row(*figs)


def removal_plot(per_cluster: pd.DataFrame, names: dict | None = None):
    """Mean |change| of slide scores when each cluster is removed (bars, largest first)."""
    from bokeh.models import ColumnDataSource, HoverTool
    from bokeh.plotting import figure

    names = names or {}
    d = per_cluster.sort_values("mean_abs_d_mean", ascending=False)
    labels = [names.get(int(c), "noise" if c < 0 else f"cluster {c}") for c in d["cluster"]]
    src = ColumnDataSource(
        {"label": labels, "mean": d["mean_abs_d_mean"].to_numpy(), "topk": d["mean_abs_d_topk"].to_numpy()}
    )
    f = figure(
        width=720,
        height=300,
        x_range=labels,
        title="Cluster removal: mean |change| of slide scores",
        tools="save",
        y_axis_label="mean |Δ slide score|",
    )
    f.vbar(x="label", top="topk", width=0.8, source=src, alpha=0.6, legend_label="top-k aggregation")
    f.vbar(x="label", top="mean", width=0.5, source=src, color="firebrick", alpha=0.8, legend_label="mean aggregation")
    f.add_tools(HoverTool(tooltips=[("cluster", "@label"), ("mean", "@mean{0.000}"), ("top-k", "@topk{0.000}")]))
    f.xaxis.major_label_orientation = 0.8
    return f
