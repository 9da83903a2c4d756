"""Screenshots of the README: the demo's cohort report and the explorer, with a box selection.

Usage (after `make demo`)::

    .venv/bin/python docs/make_screenshots.py runs/demo

Needs Debian's chromium (``make browser``).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _select(page, figure: str) -> None:
    l, t, fl, ft, fw, fh = page.evaluate(
        f"() => {{ const v = Bokeh.index.find_one(Bokeh.documents[0].get_model_by_name({figure!r}));"
        " const r = v.el.getBoundingClientRect(); const f = v.frame.bbox; return [r.left, r.top, f.left, f.top, f.width, f.height]; }"
    )
    page.mouse.move(l + fl + fw * 0.05, t + ft + fh * 0.05)
    page.mouse.down()
    page.mouse.move(l + fl + fw * 0.45, t + ft + fh * 0.5, steps=8)
    page.mouse.up()
    page.wait_for_timeout(2500)


def main(run: Path) -> None:
    from playwright.sync_api import sync_playwright

    exe = shutil.which("chromium")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "wsi_explain.cli", "serve", str(run), "--port", str(port)], cwd=REPO
    )
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/explorer", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
            page = b.new_page(viewport={"width": 1180, "height": 1250})
            page.goto((run / "report" / "index.html").resolve().as_uri())
            page.wait_for_timeout(2500)
            _select(page, "umap")
            page.screenshot(path=str(REPO / "docs" / "report.png"))
            page.goto(f"http://127.0.0.1:{port}/explorer")
            page.wait_for_timeout(3000)
            # the held-out slide with ink, coloured by probability, the first flagged cluster selected
            page.evaluate("""() => {
                const doc = Bokeh.documents[0];
                doc.get_model_by_name('colour_by').value = 'probability';
                const pick = doc.get_model_by_name('slide_picker');
                const held = pick.options.find((s) => s.includes('heldout'));
                if (held) pick.value = held;
                const cs = doc.get_model_by_name('clusters');
                const row = cs.data.flags_text.findIndex((f) => f.includes('artefact_positive'));
                if (row >= 0) cs.selected.indices = [row];
            }""")
            page.wait_for_timeout(4000)
            page.screenshot(path=str(REPO / "docs" / "explorer.png"))
            b.close()
    finally:
        server.terminate()


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo"))
