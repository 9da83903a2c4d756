"""Metrics benchmark: throughput (tiles/s) of each metric on CPU, and the score stage's peak
memory at 1x and 10x the per-cluster sample.

Usage::

    .venv/bin/python benchmarks/bench_metrics.py [--n 32] [--arch resnet18] [--sample 64] [--tile-px 128]

Part 1 (in this process): ``--n`` generated H&E tiles of 224 px, a random-init torchvision model,
Grad-CAM maps; each metric function is timed on the same inputs as the score stage calls it
(deletion/insertion 16 steps per baseline and mode, ROAD at 4 percentiles, infidelity 10
perturbations, sensitivity 8). The bare forward on the same tiles is timed in the same run, so
each metric is also given as a multiple of one forward per tile.

Part 2: one generated slide tiled into a single cluster of 10x ``--sample`` tiles (``--tile-px``),
extracted and clustered once; then the score stage runs in a fresh process with ``per_cluster``
= ``--sample`` and = 10x ``--sample`` (faithfulness and robustness), reporting peak RSS (VmHWM)
and wall time. Prints Markdown.

Part 3 (``--budget``): the default scorecard's cost. A cohort of ``--slides`` generated slides
(``--slide-tiles`` tiles each, ``--tile-px``) is tiled, extracted with the six fused CAMs and
clustered into ``--clusters`` k-means clusters, each timed; then the score stage runs with every
default (``per_cluster`` = ``--per-cluster``) in a fresh process, once with this checkout and once
with the code of ``--before`` (a git revision, checked out in a temporary worktree), on copies of
the same run. A forward hook counts the images the model is asked to forward (those under autograd,
the explanation passes, apart), per scored (tile, method), references counted as methods::

    .venv/bin/python benchmarks/bench_metrics.py --budget --before 8538fa7
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import peak_mb  # noqa: E402


def throughput(n: int, arch: str, device: str = "cpu") -> list[tuple[str, float, float]]:
    import torch
    import torchvision

    from tests.conftest import synthetic_he
    from wsi_explain import metrics as M
    from wsi_explain.core.perf import tune_malloc
    from wsi_explain.explain.attributors import make_explainer

    tune_malloc()
    torch.manual_seed(0)
    dev = torch.device(device)
    model = getattr(torchvision.models, arch)(weights=None).eval().to(dev, memory_format=torch.channels_last)
    img, _ = synthetic_he(224 * 4, 224 * (n // 4 + 1), seed=3)
    tiles = np.stack([img[(i % 4) * 224 : (i % 4 + 1) * 224, (i // 4) * 224 : (i // 4 + 1) * 224] for i in range(n)])
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = ((torch.from_numpy(tiles).float() / 255 - mean) / std).permute(0, 3, 1, 2).contiguous().to(dev)
    ex = make_explainer("gradcam", model, target_layer="layer4", tile_px=224, device=device)
    with torch.no_grad():
        t = model(x[:2]).argmax(1)
    targets = np.zeros(n, np.int64)

    def timed(fn, warm=True):
        if warm:
            fn()  # warm-up on the first call is cheap relative to the runs; time a second run
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    def fwd():
        with torch.no_grad():
            for s in range(0, n, 32):
                model(x[s : s + 32])

    maps = ex.attribute(x, targets=targets)
    rows = []
    base = timed(fwd)
    rows.append(("bare forward (reference)", n / base, 1.0))
    cases = {
        "Grad-CAM maps (fused, explicit targets)": lambda: ex.attribute(x, targets=targets),
        "deletion, blur baseline (16 steps)": lambda: M.perturbation_curve(
            model, x, maps, targets=targets, baseline="blur"
        ),
        "insertion, constant baseline (16 steps)": lambda: M.perturbation_curve(
            model, x, maps, targets=targets, mode="insertion", baseline="constant"
        ),
        "Drop/Increase in Confidence (multiply)": lambda: M.confidence_change(model, x, maps, targets=targets),
        "Drop/Increase in Confidence (mask)": lambda: M.confidence_change(model, x, maps, targets=targets, how="mask"),
        "ROAD, 4 percentiles (ours: batched; exact LU on CPU, multigrid CG on GPU)": lambda: M.road(
            model, x, maps, targets=targets
        ),
        "ROAD, 4 percentiles (pytorch-grad-cam's ROADCombined, reference)": lambda: road_reference(model, x, maps),
        "infidelity (captum, 10 perturbations)": lambda: M.infidelity_score(model, x, maps, targets=targets),
        "sensitivity_max (captum, 8 perturbations)": lambda: M.sensitivity(
            lambda z, target=None: ex.attribute(z, targets=target), x, targets=targets
        ),
        "pointing game + relevance mass/rank + IoU": lambda: (
            M.pointing_game(maps, maps > np.median(maps)),
            M.relevance_mass(maps, maps > 0.5),
            M.relevance_rank(maps, maps > 0.5),
            M.iou_coverage(maps, maps > 0.5),
        ),
        "Gini + entropy (stored 7x7 maps)": lambda: (M.gini(maps[:, ::32, ::32]), M.entropy(maps[:, ::32, ::32])),
    }
    for name, fn in cases.items():
        try:
            s = timed(fn, warm="reference" not in name)  # the reference needs no warm-up (and is slow)
        except Exception as e:  # one failing row (a reference on a device it does not support) loses only itself
            print(f"  {name}: failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            continue
        rows.append((name, n / s, s / base))
        print(f"  {name}: {n / s:.1f} tiles/s", file=sys.stderr, flush=True)
    del t
    return rows


def road_reference(model, x, maps, percentiles=(20, 40, 60, 80)):
    """pytorch-grad-cam's ROAD as its users call it (softmax targets, class 0)."""
    from pytorch_grad_cam.metrics.road import ROADCombined
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    from wsi_explain.explain.maps import scale_maps
    from wsi_explain.metrics._common import as_tensor_maps

    cams = scale_maps(as_tensor_maps(maps, tuple(x.shape[-2:]))).numpy()
    return ROADCombined(list(percentiles))(x, cams, [ClassifierOutputSoftmaxTarget(0)] * len(x), model)


def _build_run(root: Path, n_tiles: int, tile_px: int, arch: str) -> Path:
    from tests.conftest import synthetic_he
    from tiling import write_pyramidal_tiff
    from wsi_explain import RunFolder, TileConfig, discover_slides, run_tile_stage
    from wsi_explain.core.config import ClusterConfig, ExtractConfig
    from wsi_explain.stages.cluster import run_cluster_stage
    from wsi_explain.stages.extract import run_extract_stage

    side = int(np.ceil(np.sqrt(n_tiles * 1.1))) * tile_px
    img = np.full((side, side, 3), 0, np.uint8)
    img[:], _ = synthetic_he(side, side, seed=5, blob=(0.5, 0.5, 0.9, 0.9))
    slide = write_pyramidal_tiff(root / "big.tif", img, mpp=0.5)
    run_dir = root / "run"
    with RunFolder(run_dir) as run:
        run_tile_stage(
            run, discover_slides([slide]), TileConfig(tile_px=tile_px, mpp_target=0.5, min_tissue=0.0, verify="none")
        )
        run_extract_stage(run, ExtractConfig(arch=arch, num_classes=2, methods=("gradcam",), workers=0, batch_size=32))
        run_cluster_stage(run, ClusterConfig(method="kmeans", k=1, pca=16))
    return run_dir


def score_child(run_dir: str, per_cluster: int) -> dict:
    import shutil

    from wsi_explain import RunFolder
    from wsi_explain.core.config import ScoreConfig
    from wsi_explain.core.perf import tune_malloc
    from wsi_explain.stages.score import run_score_stage

    tune_malloc()
    dst = Path(run_dir).parent / f"run_{per_cluster}"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(run_dir, dst)
    cfg = ScoreConfig(
        per_cluster=per_cluster,
        groups=("faithfulness", "robustness"),
        methods=("gradcam",),
        baselines=("constant",),
        steps=8,
        road_percentiles=(50,),
        infidelity_samples=4,
        sensitivity_samples=2,
    )
    t0 = time.perf_counter()
    with RunFolder(dst) as run:
        out = run_score_stage(run, cfg)
    s = time.perf_counter() - t0
    return {
        "per_cluster": per_cluster,
        "sampled": out.n_sampled,
        "seconds": round(s, 1),
        "tiles_per_s": round(out.n_sampled / s, 2),
        "peak_mb": round(peak_mb()),
    }


def _build_cohort(
    root: Path, slides: int, slide_tiles: int, tile_px: int, arch: str, clusters: int, workers: int = 0
) -> tuple:
    """Generated cohort, tiled, extracted (six CAMs) and clustered; returns (run folder, seconds per stage)."""
    from tests.conftest import synthetic_he
    from tiling import write_pyramidal_tiff
    from wsi_explain import RunFolder, TileConfig, discover_slides, run_tile_stage
    from wsi_explain.core.config import ClusterConfig, ExtractConfig
    from wsi_explain.stages.cluster import run_cluster_stage
    from wsi_explain.stages.extract import run_extract_stage

    side = int(np.ceil(np.sqrt(slide_tiles * 1.1))) * tile_px
    paths = []
    for i in range(slides):
        img, _ = synthetic_he(side, side, seed=10 + i, blob=(0.5, 0.5, 0.9, 0.9))
        paths.append(write_pyramidal_tiff(root / f"s{i:02d}.tif", img, mpp=0.5))
    secs = {}
    with RunFolder(root / "run") as run:
        t0 = time.perf_counter()
        run_tile_stage(run, discover_slides(paths), TileConfig(tile_px=tile_px, mpp_target=0.5, min_tissue=0.0))
        secs["tile"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_extract_stage(run, ExtractConfig(arch=arch, num_classes=2, workers=workers))
        secs["extract"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_cluster_stage(run, ClusterConfig(method="kmeans", k=clusters, pca=16))
        secs["cluster"] = time.perf_counter() - t0
    return root / "run", secs


def budget_child(run_dir: str, per_cluster: int, name: str, overrides: dict) -> dict:
    """The score stage with every default on a copy of ``run_dir``, forwards counted."""
    import shutil

    import pandas as pd

    from wsi_explain import RunFolder
    from wsi_explain.core.config import ScoreConfig
    from wsi_explain.core.perf import tune_malloc
    from wsi_explain.explain.fused import FusedExtractor
    from wsi_explain.stages import score_sample
    from wsi_explain.stages.score import run_score_stage

    tune_malloc()
    count = {"images": 0, "grad": 0}

    def hook(_mod, args):
        count["images"] += len(args[0])

    init = score_sample.SampleScorer.__init__

    def counted_init(self, *a, **k):
        init(self, *a, **k)
        self.fx.module.register_forward_pre_hook(hook)

    score_sample.SampleScorer.__init__ = counted_init
    fused_forward = FusedExtractor.forward

    def counted_forward(self, x, **k):  # explanation passes (forward + backward to the CAM layer)
        count["grad"] += len(x)
        return fused_forward(self, x, **k)

    FusedExtractor.forward = counted_forward
    dst = Path(run_dir).parent / f"score_{name}"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(run_dir, dst)
    # every default, the sanity tiles scaled with the sample (8 of the default 64)
    cfg = ScoreConfig(per_cluster=per_cluster, sanity_tiles=max(1, per_cluster // 8), **overrides)
    t0 = time.perf_counter()
    with RunFolder(dst) as run:
        run_score_stage(run, cfg)
    s = time.perf_counter() - t0
    tm = pd.read_parquet(dst / "cohort" / "tile_metrics.parquet")
    # one column per method:metric; the methods scored (references included) have a deletion AUC
    methods = sorted({c.split(":")[0] for c in tm.columns if ":" in c and "deletion_auc" in c.split(":")[1]})
    tiles = int(tm["sampled"].sum())
    return {
        "name": name,
        "seconds": round(s, 1),
        "tiles": tiles,
        "pairs": tiles * len(methods),
        "methods": methods,
        "images": count["images"],
        "grad_images": count["grad"],
    }


def budget(a) -> None:
    import shutil

    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    rev = rev.strip() + (" + uncommitted changes" if dirty else "")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run_dir, secs = _build_cohort(tmp, a.slides, a.slide_tiles, a.tile_px, a.arch, a.clusters, a.workers)
        import pandas as pd

        n_tiles = len(pd.read_parquet(run_dir / "cohort" / "tiles.parquet", columns=["tile_id"]))
        res = []
        codes = [("this checkout " + rev, REPO, {})]
        if a.before:
            wt = tmp / "before"
            subprocess.run(
                ["git", "worktree", "add", "--detach", str(wt), a.before], check=True, cwd=REPO, capture_output=True
            )
            codes.insert(0, (f"before ({a.before})", wt, {}))
            codes.append((f"this checkout, steps {a.before_steps} (the old default)", REPO, {"steps": a.before_steps}))
        try:
            for i, (name, code, over) in enumerate(codes):
                env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")])}
                cmd = [sys.executable, __file__, "--budget-child", str(run_dir), str(a.per_cluster), str(i), str(code)]
                cmd += ["--overrides", json.dumps(over)]
                p = subprocess.run(cmd, capture_output=True, text=True, cwd=code, env=env)
                if p.returncode != 0:
                    raise SystemExit(p.stderr[-4000:])
                r = json.loads(p.stdout.strip().splitlines()[-1])
                r["name"] = name
                res.append(r)
        finally:
            if a.before:
                subprocess.run(["git", "worktree", "remove", "--force", str(tmp / "before")], cwd=REPO)
                shutil.rmtree(tmp / "before", ignore_errors=True)
    ext = secs["extract"] + secs["cluster"]
    print(
        f"### Default scorecard: {a.slides} slides, {n_tiles} tiles of {a.tile_px} px, {a.arch} (random init), "
        f"{a.clusters} clusters, per_cluster {a.per_cluster}\n"
    )
    import torch

    dev = f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "CPU"
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {dev}, torch {torch.__version__}\n")
    print(
        f"tile {secs['tile']:.1f} s, extract (six fused CAMs, {a.workers} reader workers) {secs['extract']:.1f} s, "
        f"cluster {secs['cluster']:.1f} s\n"
    )
    print(
        "| code | tiles scored | (tile, method) pairs | forwards per pair | of which explanation passes | "
        "score s | score / (extract + cluster) | break-even tiles per slide, 10 slides x 10 clusters x 64 |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in res:
        per_pair = r["images"] / r["pairs"]
        # score time grows with the sampled tiles, extraction and clustering with the cohort's: the
        # slide size at which 10 slides x 10 clusters x 64 sampled tiles score as long as they extract
        s640 = r["seconds"] / r["tiles"] * 640
        even = s640 / (ext / n_tiles) / 10
        print(
            f"| {r['name']} | {r['tiles']} | {r['pairs']} | {per_pair:.1f} | {r['grad_images'] / r['pairs']:.1f} | "
            f"{r['seconds']} | {r['seconds'] / ext:.2f} | {even:,.0f} |"
        )
    print(f"\nmethods scored: {', '.join(res[-1]['methods'])}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--device", default="cpu", help="part 1's device: cpu or cuda[:N]")
    ap.add_argument("--sample", type=int, default=64)
    ap.add_argument("--tile-px", type=int, default=128)
    ap.add_argument("--child", nargs=2)
    ap.add_argument("--throughput-only", action="store_true", help="skip part 2 (score-stage memory)")
    ap.add_argument("--budget", action="store_true", help="part 3 only: the default scorecard's cost")
    ap.add_argument("--before", help="git revision whose score stage is measured beside this checkout's")
    ap.add_argument("--slides", type=int, default=10)
    ap.add_argument("--slide-tiles", type=int, default=100)
    ap.add_argument("--clusters", type=int, default=10)
    ap.add_argument("--per-cluster", type=int, default=4)
    ap.add_argument("--workers", type=int, default=0, help="the budget cohort's extraction reader workers")
    ap.add_argument("--budget-child", nargs=4)
    ap.add_argument("--overrides", default="{}", help="ScoreConfig fields of a budget child (JSON)")
    ap.add_argument("--before-steps", type=int, default=16, help="the deletion steps of the --before default")
    a = ap.parse_args()
    if a.budget_child:
        sys.path.insert(0, a.budget_child[3])  # the code measured (this checkout or the --before worktree)
        for m in [m for m in sys.modules if m == "wsi_explain" or m.startswith("wsi_explain.")]:
            del sys.modules[m]
        run_dir, per_cluster, name, _ = a.budget_child
        print(json.dumps(budget_child(run_dir, int(per_cluster), name, json.loads(a.overrides))))
        return
    if a.budget:
        budget(a)
        return
    if a.child:
        print(json.dumps(score_child(a.child[0], int(a.child[1]))))
        return
    import torch

    print(
        f"## Metrics ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()})\n"
    )
    print(
        f"Command: `.venv/bin/python benchmarks/bench_metrics.py --n {a.n} --arch {a.arch} --device {a.device} --sample {a.sample} --tile-px {a.tile_px}`\n"
    )
    rows = throughput(a.n, a.arch, a.device)
    gpu = f" on {torch.cuda.get_device_name(a.device)}" if a.device.startswith("cuda") else ""
    print(f"### Throughput on {a.n} tiles of 224 px, {a.arch} (random init), Grad-CAM maps{gpu}\n")
    print("| metric | tiles/s | cost in forwards per tile |\n| --- | ---: | ---: |")
    for name, tps, ratio in rows:
        print(f"| {name} | {tps:.1f} | {ratio:.1f} |")
    if a.throughput_only:
        return
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = _build_run(Path(tmp), 10 * a.sample, a.tile_px, a.arch)
        res = []
        for pc in (a.sample, 10 * a.sample):
            p = subprocess.run(
                [sys.executable, __file__, "--child", str(run_dir), str(pc)], capture_output=True, text=True, cwd=REPO
            )
            if p.returncode != 0:
                raise SystemExit(p.stderr)
            res.append(json.loads(p.stdout.strip().splitlines()[-1]))
    print(f"\n### Score stage peak memory, one cluster, {a.tile_px} px tiles, faithfulness + robustness of Grad-CAM\n")
    print("| per_cluster | tiles scored | wall s | tiles/s | peak RSS MB |\n| ---: | ---: | ---: | ---: | ---: |")
    for r in res:
        print(f"| {r['per_cluster']} | {r['sampled']} | {r['seconds']} | {r['tiles_per_s']} | {r['peak_mb']} |")


if __name__ == "__main__":
    main()
