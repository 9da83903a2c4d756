"""Explorer benchmark: the linked explorer with 200,000 tiles in headless Chromium, and the
deep-zoom tile server of ``wsi-explain serve``.

Usage::

    .venv/bin/python benchmarks/bench_viz.py [--n 200000]
    .venv/bin/python benchmarks/bench_viz.py --deep-zoom [--per-zoom 60] [--clients 8]

``--deep-zoom``: the server's deep-zoom route (the same handler and thread pool) over the generated
40,000 x 30,000 px benchmark slide (``bench_tiling.make_slide``); per zoom level, random tiles are
requested once with an empty cache (cold: read, resize, JPEG, write) and again (warm: the cached
file), then all of them by 8 concurrent keep-alive clients, cold and warm. Prints Markdown.

Builds a synthetic cohort table (20 clusters on a 2-D UMAP, 50 slides), writes the standalone
explorer page (as the cohort report does), opens it in Debian's Chromium (playwright, software
WebGL on a machine without a GPU) and measures: HTML size, time until the document has rendered,
a box selection dragged over about half of the UMAP (until the slide panel and gallery have
updated), a colour change (cluster -> probability) and a wheel zoom. Prints Markdown.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def cohort(n: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    rng = np.random.default_rng(seed)
    k, n_slides = 20, 50
    centres = rng.uniform(-10, 10, (k, 2))
    cl = rng.integers(0, k, n)
    xy = centres[cl] + rng.normal(0, 0.8, (n, 2))
    sid = rng.integers(0, n_slides, n)
    per = np.bincount(sid, minlength=n_slides)
    pos = np.concatenate([np.arange(c) for c in per])
    order = np.argsort(sid, kind="stable")
    tile_id = np.empty(n, np.int64)
    tile_id[order] = pos
    side = 64
    tiles = pd.DataFrame(
        {
            "slide_id": [f"slide_{s:03d}" for s in sid],
            "tile_id": tile_id,
            "x": (tile_id % side) * 448,
            "y": (tile_id // side) * 448,
            "size0": 448,
            "umap_x": xy[:, 0],
            "umap_y": xy[:, 1],
            "cluster": cl,
            "membership": rng.random(n),
            "confidence": rng.random(n),
            "prob_pos": rng.random(n),
            "pred": rng.integers(0, 2, n),
            "outlier_score": rng.random(n),
        }
    )
    clusters = pd.DataFrame(
        {"cluster": np.arange(k), "size": np.bincount(cl, minlength=k), "positive_rate": rng.random(k)}
    )
    slides = {
        f"slide_{s:03d}": {"url": "data:,", "width": side * 448, "height": (per.max() // side + 1) * 448}
        for s in range(n_slides)
    }
    return tiles, clusters, slides


def _frame(pg) -> None:
    pg.evaluate("() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)))")


def bare_scatter(n: int) -> tuple[float, float]:
    """First render and wheel-zoom time of a plain WebGL scatter of n points (the floor)."""
    from bokeh.embed import file_html
    from bokeh.plotting import figure
    from bokeh.resources import INLINE
    from playwright.sync_api import sync_playwright

    rng = np.random.default_rng(0)
    f = figure(
        width=560, height=520, output_backend="webgl", tools="wheel_zoom", active_scroll="wheel_zoom", name="umap"
    )
    f.scatter(rng.normal(size=n), rng.normal(size=n), size=4)
    with tempfile.TemporaryDirectory() as d:
        page = Path(d) / "bare.html"
        page.write_text(file_html(f, INLINE, "bare"))
        with sync_playwright() as p:
            b = p.chromium.launch(
                executable_path=shutil.which("chromium"), args=["--no-sandbox", "--enable-unsafe-swiftshader"]
            )
            pg = b.new_page(viewport={"width": 800, "height": 700})
            t0 = time.perf_counter()
            pg.goto(page.as_uri())
            pg.wait_for_function(
                "() => window.Bokeh && Bokeh.documents.length && Bokeh.index.find_one(Bokeh.documents[0].get_model_by_name('umap'))"
            )
            _frame(pg)
            t_render = time.perf_counter() - t0
            box = pg.evaluate(
                "() => { const v = Bokeh.index.find_one(Bokeh.documents[0].get_model_by_name('umap'));"
                " const r = v.el.getBoundingClientRect(); const f = v.frame.bbox;"
                " return [r.left + f.left, r.top + f.top, f.width, f.height]; }"
            )
            t0 = time.perf_counter()
            pg.mouse.move(box[0] + box[2] / 2, box[1] + box[3] / 2)
            pg.mouse.wheel(0, -400)
            _frame(pg)
            t_zoom = time.perf_counter() - t0
            b.close()
    return t_render, t_zoom


def _pyramid_server(path: str, W: int, H: int, cache: str, port: int, ready) -> None:
    """Process target: the deep-zoom route of ``wsi-explain serve`` (the same handler and thread
    pool) over one slide, until killed."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from tornado.web import Application

    from wsi_explain.io.deepzoom import DeepZoomSlide, DeepZoomTiles
    from wsi_explain.report.serve import DEEP_ZOOM_ROUTE, deep_zoom_handler

    pyramid = DeepZoomTiles({"bench": DeepZoomSlide(path, W, H, 0.25)}, cache_dir=Path(cache))
    pyramid.tissue_rgb("bench", pyramid.zmax, 0, 0)  # opens the slide (measured apart)
    pool = ThreadPoolExecutor(max_workers=4)
    app = Application([(DEEP_ZOOM_ROUTE, deep_zoom_handler(), {"pyramid": pyramid, "overlays": None, "pool": pool})])
    asyncio.set_event_loop(asyncio.new_event_loop())
    app.listen(port, address="127.0.0.1")
    ready.set()
    asyncio.get_event_loop().run_forever()


def _serve_pyramid(path: Path, W: int, H: int, cache: Path):
    """Start :func:`_pyramid_server` in its own process (clients and server do not share a GIL, as
    with a browser) -> (base URL, process)."""
    import multiprocessing as mp
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_pyramid_server, args=(str(path), W, H, str(cache), port, ready), daemon=True)
    proc.start()
    if not ready.wait(120):
        proc.kill()
        raise RuntimeError("the deep-zoom server did not start")
    return f"http://127.0.0.1:{port}", proc


def _fetch(base: str, paths: list[str], clients: int) -> tuple[np.ndarray, float]:
    """GET every path with ``clients`` keep-alive connections in parallel (as a browser's) ->
    (latency per request in ms, wall seconds)."""
    import http.client
    from concurrent.futures import ThreadPoolExecutor
    from urllib.parse import urlparse

    u = urlparse(base)
    lat = np.zeros(len(paths))

    def worker(k: int) -> None:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        for i in range(k, len(paths), clients):
            t0 = time.perf_counter()
            conn.request("GET", paths[i])
            r = conn.getresponse()
            r.read()
            assert r.status == 200, (paths[i], r.status)
            lat[i] = (time.perf_counter() - t0) * 1e3
        conn.close()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        list(ex.map(worker, range(clients)))
    return lat, time.perf_counter() - t0


def deep_zoom(per_zoom: int, clients: int, seed: int = 0) -> None:
    """Latency of the deep-zoom tile server on the 40,000 x 30,000 px benchmark slide."""
    from bench_tiling import make_slide

    from wsi_explain.io.deepzoom import DeepZoomSlide, DeepZoomTiles

    W, H = 40000, 30000
    path = make_slide((H, W))
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as d:
        pyramid = DeepZoomTiles({"bench": DeepZoomSlide(str(path), W, H, 0.25)})  # geometry; opening time
        t0 = time.perf_counter()
        pyramid.tissue_rgb("bench", pyramid.zmax, 0, 0)
        t_open = time.perf_counter() - t0
        levels = pyramid._reader("bench").info.level_downsamples
        base, proc = _serve_pyramid(path, W, H, Path(d) / "a")
        rows, all_paths = [], {}
        for z in range(pyramid.zmax + 1):
            side = 256 * pyramid.downsample(z)
            nx, ny = int(np.ceil(W / side)), int(np.ceil(H / side))
            cells = rng.permutation(nx * ny)[:per_zoom]
            all_paths[z] = [f"/dz/bench/tissue/{z}/{c % nx}/{c // nx}.jpg" for c in cells]
        for z, paths in all_paths.items():
            cold, _ = _fetch(base, paths, 1)
            warm, _ = _fetch(base, paths, 1)
            rows.append((z, pyramid.downsample(z), len(paths), cold, warm))
        proc.kill()
        # 8 browser-like clients on tiles not read yet (a fresh server and cache), then again
        base2, proc2 = _serve_pyramid(path, W, H, Path(d) / "b")
        mix = [p for z in sorted(all_paths) for p in all_paths[z]]
        mix = [mix[i] for i in rng.permutation(len(mix))]
        cold_c, cold_s = _fetch(base2, mix, clients)
        warm_c, warm_s = _fetch(base2, mix, clients)
        proc2.kill()
    print(f"## Deep-zoom tile server ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)\n")
    print(
        f"Command: `.venv/bin/python benchmarks/bench_viz.py --deep-zoom --per-zoom {per_zoom} --clients {clients}`\n"
    )
    print(
        f"Slide: {W} x {H} px JPEG pyramidal TIFF (level downsamples {', '.join(f'{x:g}' for x in levels)}), "
        f"256-px tiles, zmax {pyramid.zmax}; opening it (once per slide and server, not in the figures below) "
        f"took {t_open * 1e3:.0f} ms. Server and clients in separate processes.\n"
    )
    print("| zoom | level-0 px per tile px | tiles | cold p50 ms | cold p95 ms | warm p50 ms | warm p95 ms |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    q = lambda a, p: f"{np.percentile(a, p):.1f}"  # noqa: E731
    for z, ds, n, cold, warm in rows:
        print(f"| {z} | {ds:g} | {n} | {q(cold, 50)} | {q(cold, 95)} | {q(warm, 50)} | {q(warm, 95)} |")
    cold = np.concatenate([r[3] for r in rows])
    warm = np.concatenate([r[4] for r in rows])
    print(f"| all | | {len(cold)} | {q(cold, 50)} | {q(cold, 95)} | {q(warm, 50)} | {q(warm, 95)} |")
    print(
        f"\n{clients} concurrent clients, {len(mix)} tiles of every zoom in random order: cold "
        f"{len(mix) / cold_s:.0f} tiles/s (p95 {q(cold_c, 95)} ms), warm {len(mix) / warm_s:.0f} tiles/s "
        f"(p95 {q(warm_c, 95)} ms)."
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--deep-zoom", action="store_true", help="benchmark the deep-zoom tile server instead")
    ap.add_argument("--per-zoom", type=int, default=60, help="deep zoom: tiles requested per zoom level")
    ap.add_argument("--clients", type=int, default=8, help="deep zoom: concurrent clients")
    a = ap.parse_args()
    if a.deep_zoom:
        return deep_zoom(a.per_zoom, a.clients)
    from playwright.sync_api import sync_playwright

    import viz

    tiles, clusters, slides = cohort(a.n)
    parts = viz.explorer_layout(
        tiles,
        clusters,
        slides=slides,
        colour_by={"cluster": "cluster", "probability": "prob_pos", "slide": "slide_id"},
        thumb_template="tiles/{slide}_{tile}_{method}.jpg",
        full_template="tiles/{slide}_{tile}_all.jpg",
        methods=["gradcam"],
        table_columns={"tiles": "size", "positive rate": "positive_rate"},
    )
    with tempfile.TemporaryDirectory() as d:
        page_path = Path(d) / "index.html"
        viz.copy_bokeh_js(Path(d) / "static")
        viz.render_page(page_path, title="bench", body="<!--plot:x-->", plots={"x": parts.layout}, css=viz.GALLERY_CSS)
        size_mb = page_path.stat().st_size / 1e6
        with sync_playwright() as p:
            b = p.chromium.launch(
                executable_path=shutil.which("chromium"), args=["--no-sandbox", "--enable-unsafe-swiftshader"]
            )
            pg = b.new_page(viewport={"width": 1280, "height": 1300})
            errors = []
            # the synthetic cohort has no tile images: their failed loads are expected, not counted
            pg.on(
                "console",
                lambda m: (
                    errors.append(m.text)
                    if m.type == "error"
                    and "ERR_FILE_NOT_FOUND" not in m.text
                    and "Failed to load resource" not in m.text
                    else None
                ),
            )
            t0 = time.perf_counter()
            pg.goto(page_path.as_uri())
            pg.wait_for_function(
                "() => window.Bokeh && Bokeh.documents.length && Bokeh.index.find_one("
                "Bokeh.documents[0].get_model_by_name('umap')) && !Bokeh.index.find_one("
                "Bokeh.documents[0].get_model_by_name('umap')).is_idle === false",
                timeout=300_000,
            )
            pg.evaluate("() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)))")
            t_render = time.perf_counter() - t0
            box = pg.evaluate(
                "() => { const v = Bokeh.index.find_one(Bokeh.documents[0].get_model_by_name('umap'));"
                " const r = v.el.getBoundingClientRect(); const f = v.frame.bbox;"
                " return [r.left + f.left, r.top + f.top, f.width, f.height]; }"
            )
            x0, y0, w, h = box
            t0 = time.perf_counter()
            pg.mouse.move(x0 + 5, y0 + 5)
            pg.mouse.down()
            pg.mouse.move(x0 + w * 0.5, y0 + h * 0.7, steps=5)
            pg.mouse.up()
            pg.wait_for_function(
                "() => Bokeh.documents[0].get_model_by_name('gallery').text.includes('selected')", timeout=300_000
            )
            pg.evaluate("() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)))")
            t_select = time.perf_counter() - t0
            n_sel = pg.evaluate("() => Bokeh.documents[0].get_model_by_name('tiles').selected.indices.length")
            t0 = time.perf_counter()
            pg.evaluate("() => { Bokeh.documents[0].get_model_by_name('colour_by').value = 'probability'; }")
            pg.evaluate("() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)))")
            t_colour = time.perf_counter() - t0
            t0 = time.perf_counter()
            pg.mouse.move(x0 + w / 2, y0 + h / 2)
            pg.evaluate(
                "() => { const t = Bokeh.documents[0].get_model_by_name('umap').toolbar.tools.find((t) => t.type == 'WheelZoomTool'); "
                "Bokeh.documents[0].get_model_by_name('umap').toolbar.active_scroll = t; }"
            )
            pg.mouse.wheel(0, -400)
            pg.evaluate("() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)))")
            t_zoom = time.perf_counter() - t0
            b.close()
    base = bare_scatter(a.n)
    print(
        f"## Explorer ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, headless Chromium, software WebGL)\n"
    )
    print(f"Command: `.venv/bin/python benchmarks/bench_viz.py --n {a.n}`\n")
    print(
        "| tiles | HTML MB | first render s | box select (linked slide + gallery) s | tiles selected | recolour s | wheel zoom s | console errors |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(
        f"| {a.n} | {size_mb:.1f} | {t_render:.1f} | {t_select:.2f} | {n_sel} | {t_colour:.2f} | {t_zoom:.2f} | {len(errors)} |"
    )
    print(
        f"\nBare Bokeh baseline in the same run (one WebGL scatter of the same {a.n} points, nothing linked): "
        f"first render {base[0]:.1f} s, wheel zoom {base[1]:.2f} s."
    )


if __name__ == "__main__":
    main()
