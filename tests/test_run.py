"""The run folder: manifest, atomic writes, locking, skipping; slide ids and fingerprints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from wsi_explain import RunFolder, RunLockedError, discover_slides, safe_slide_id, slide_fingerprint
from wsi_explain.core.errors import ManifestError, SlideListError
from wsi_explain.core.run import SCHEMA_VERSION


def test_manifest_roundtrip_and_skip_logic(tmp_path):
    with RunFolder(tmp_path / "run") as run:
        assert not run.is_done("tile", "s1", params="p", fingerprint="f")
        (run.path / "out.txt").write_text("x")
        run.record("tile", "s1", status="done", params="p", fingerprint="f", outputs=["out.txt"])
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert m["schema_version"] == SCHEMA_VERSION
    rec = m["stages"]["tile"]["slides"]["s1"]
    assert rec["status"] == "done" and "python" in rec["versions"] and "numpy" in rec["versions"]
    with RunFolder(tmp_path / "run") as run:
        assert run.is_done("tile", "s1", params="p", fingerprint="f")
        assert not run.is_done("tile", "s1", params="other", fingerprint="f")
        assert not run.is_done("tile", "s1", params="p", fingerprint="changed")
        (run.path / "out.txt").unlink()
        assert not run.is_done("tile", "s1", params="p", fingerprint="f")  # outputs must exist


def test_no_temporary_files_left(tmp_path):
    with RunFolder(tmp_path) as run:
        for i in range(5):
            run.record("tile", f"s{i}", status="done")
    leftovers = [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]
    assert leftovers == []


def test_second_writer_is_refused(tmp_path):
    code = (
        "import sys, time; from wsi_explain import RunFolder; r = RunFolder(sys.argv[1]); "
        "print('locked', flush=True); time.sleep(30)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"in use by another process \\(pid {proc.pid}\\)"):
            RunFolder(tmp_path)
        RunFolder(tmp_path, readonly=True)  # readers are never refused
    finally:
        proc.kill()
        proc.wait()
    RunFolder(tmp_path).close()  # the lock dies with its process


def test_corrupt_manifest_is_reported(tmp_path):
    (tmp_path / "manifest.json").write_text("{oops")
    with pytest.raises(ManifestError, match="manifest.json.*unreadable"):
        RunFolder(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 999}))
    with pytest.raises(ManifestError, match="schema 999"):
        RunFolder(tmp_path)


def test_slide_ids_are_safe_and_unique(tmp_path):
    assert safe_slide_id("a b<script>.svs") == "a_b_script_.svs"
    assert safe_slide_id("...") == "slide"
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "slide 1.svs").write_bytes(b"x")
    srcs = discover_slides([tmp_path / "a", tmp_path / "b", tmp_path / "missing.tif"])
    assert [s.slide_id for s in srcs] == ["slide_1", "slide_1-2", "missing"]
    assert not srcs[2].path.exists()  # kept, so the batch can record it as failed


def test_cohort_csv(tmp_path):
    (tmp_path / "s1.svs").write_bytes(b"x")
    (tmp_path / "cohort.csv").write_text("path,label,site,mpp\ns1.svs,1,A,0.25\nother/s2.tif,0,B,\n")
    srcs = discover_slides([tmp_path / "cohort.csv"], mpp=0.5)
    assert srcs[0].path == tmp_path / "s1.svs" and srcs[0].mpp == 0.25 and srcs[0].meta == {"label": "1", "site": "A"}
    assert srcs[1].mpp == 0.5 and srcs[1].slide_id == "s2"
    (tmp_path / "bad.csv").write_text("file_name,label\nx,1\n")
    with pytest.raises(SlideListError, match="bad.csv.*'path'"):
        discover_slides([tmp_path / "bad.csv"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlideListError, match="no slide file"):
        discover_slides([tmp_path / "empty"])


def test_fingerprint_sees_changes(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(os.urandom(3 << 20))
    a = slide_fingerprint(p)
    assert a == slide_fingerprint(p)
    assert a != slide_fingerprint(p, properties={"openslide.mpp-x": "0.25"})
    data = bytearray(p.read_bytes())
    data[-10] ^= 0xFF
    st = p.stat()
    p.write_bytes(bytes(data))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: the tail hash still differs
    assert slide_fingerprint(p) != a
    time.sleep(0.01)


def test_progress_in_a_log_says_each_tenth_with_rate_and_eta():
    """Piped to a file (CI, `make demo > log`), long steps print one line at the start and one per
    10 % with the rate and the ETA; on a terminal the same calls drive a rich bar."""
    import io

    from rich.console import Console

    from wsi_explain.cli.console import progress_bar

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False, width=200)
    with progress_bar(console=console, rate=True) as bar:
        task = bar.add_task("scoring", total=50)
        for _ in range(50):
            bar.advance(task, 1)
        other = bar.add_task("reading", total=None)  # no total: only its start is said
        bar.update(other, advance=3)
    lines = buf.getvalue().splitlines()
    assert lines[0] == "scoring: started (50 to do)"
    tenths = [ln for ln in lines if ln.startswith("scoring: ") and "%" in ln]
    assert [ln.split("(")[1].split(")")[0] for ln in tenths] == [f"{10 * k} %" for k in range(1, 11)]
    assert all("tiles/s" in ln for ln in tenths) and all("ETA" in ln for ln in tenths[:-1])
    assert "ETA" not in tenths[-1] and lines[-1] == "reading: started"
    term = Console(file=io.StringIO(), force_terminal=True)
    with progress_bar(console=term) as bar:  # the terminal path: a rich Progress underneath
        bar.update(bar.add_task("x", total=2), advance=2)
    assert bar._bar is not None and bar._tasks == {}
