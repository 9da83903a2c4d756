"""Extraction benchmark: our pipeline vs the bare forward, fused CAMs vs pytorch-grad-cam, memory.

Usage::

    .venv/bin/python benchmarks/bench_extract.py [--tiles 512] [--pgc-tiles 64] [--mem-tiles 100000]
                                                  [--archs resnet18 resnet50 efficientnet_lite0]
    .venv/bin/python benchmarks/bench_extract.py --cams-only --archs fcn_resnet50 timm:vit_small_patch16_224

Everything is measured in one process on one machine, and reported as ratios:

1. pipeline (slide read + decode in worker processes + model; embeddings and logits only) vs the
   bare forward pass on tensors already in memory (same model, batch 32, channels_last);
2. the fused pass with six CAMs vs the bare forward (time ratio);
3. pytorch-grad-cam computing the same six CAMs method by method vs the fused pass;
4. peak RSS while extracting ``--mem-tiles`` tiles with a tiny model (32 px tiles), sampled as the
   run goes: it must not grow with the number of tiles.

``--device cuda`` runs everything on the GPU (autocast as the extraction stage uses it, tiles read
by worker processes into pinned memory) and adds the GPU's busy share during the pipeline runs:
``nvidia-smi``'s utilisation sampled every 100 ms, and the pipeline / bare ratio (the bare forward
keeps the GPU busy all the time, so the ratio is the share of the time it is busy in the pipeline).

Prints Markdown for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_tiling import make_slide  # noqa: E402

import tiling  # noqa: E402
from wsi_explain.core.config import ExtractConfig  # noqa: E402
from wsi_explain.core.perf import tune_malloc  # noqa: E402
from wsi_explain.explain.extractors import build_extractors  # noqa: E402
from wsi_explain.explain.fused import FusedExtractor  # noqa: E402
from wsi_explain.explain.load import load_model  # noqa: E402
from wsi_explain.stages.extract import extract_slide  # noqa: E402

METHODS = ("gradcam", "gradcampp", "xgradcam", "hirescam", "layercam", "eigencam")
BATCH = 32


def rss_mb(field: str = "VmRSS") -> float:
    """Resident memory of this process (``VmHWM``: its peak; unlike ru_maxrss it is not inherited
    from the parent across fork + exec)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_forward(module, x: torch.Tensor, reps: int, repeats: int = 3, autocast=contextlib.nullcontext) -> float:
    """tiles/s of ``module(x)`` under inference_mode (and ``autocast()``: the fused pass's, so that
    both run in the same precision), x already in memory on its device (channels_last); the median
    of ``repeats`` timings of ``reps`` batches."""
    module = module.to(memory_format=torch.channels_last).eval()
    x = x.contiguous(memory_format=torch.channels_last)
    rates = []
    with torch.inference_mode(), autocast():
        module(x)
        sync(x.device)
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(reps):
                module(x)
            sync(x.device)
            rates.append(reps * len(x) / (time.perf_counter() - t0))
    return float(np.median(rates))


class GpuBusy:
    """Mean GPU utilisation (%) reported by ``nvidia-smi`` every 100 ms while the block runs
    (None when nvidia-smi is not there)."""

    def __enter__(self):
        import shutil
        import subprocess

        self.samples: list[float] = []
        self._proc = None
        if shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(
                [
                    "nvidia-smi",
                    "--query-gpu=utilization.gpu",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    "100",
                    "-i",
                    "0",
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
        return self

    def __exit__(self, *exc):
        if self._proc is not None:
            self._proc.terminate()
            out, _ = self._proc.communicate(timeout=10)
            self.samples = [float(v) for v in out.split() if v.replace(".", "", 1).isdigit()]

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


def interleaved(fns: dict, rounds: int, n_per_call: int) -> dict:
    """tiles/s of each function, timed in alternating order round after round, so that the
    machine's drift (turbo, other load) hits all of them alike."""
    total = dict.fromkeys(fns, 0.0)
    for fn in fns.values():
        fn()  # warm-up
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            total[name] += time.perf_counter() - t0
    return {k: rounds * n_per_call / v for k, v in total.items()}


def pgc(module, layer, x: torch.Tensor, reps: int) -> float:
    import pytorch_grad_cam as P
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    classes = [P.GradCAM, P.GradCAMPlusPlus, P.XGradCAM, P.HiResCAM, P.LayerCAM, P.EigenCAM]
    with torch.no_grad():
        targets = [ClassifierOutputTarget(int(t)) for t in module(x).argmax(1)]
    t0 = time.perf_counter()
    for _ in range(reps):
        for cls in classes:
            cam = cls(model=module, target_layers=[layer])
            try:
                cam(input_tensor=x, targets=targets)
            finally:
                cam.activations_and_grads.release()
    return reps * len(x) / (time.perf_counter() - t0)


def pgc_targets(module, x: torch.Tensor, segmentation: bool) -> list:
    """pytorch-grad-cam targets of the fused pass's defaults: the predicted class, or for a
    segmentation net the largest class over its predicted pixels (SemanticSegmentationTarget)."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget, SemanticSegmentationTarget

    with torch.no_grad():
        out = module(x)
    if not segmentation:
        return [ClassifierOutputTarget(int(t)) for t in out.argmax(1)]
    pred = out.argmax(1)
    k = out.shape[1]
    cls = torch.stack([(pred == c).float().mean((1, 2)) for c in range(k)], 1).argmax(1)
    return [SemanticSegmentationTarget(int(c), (p == c).float().cpu().numpy()) for c, p in zip(cls, pred)]


def cam_rows(archs: list[str], reps: int, pgc_reps: int, imgs: np.ndarray, device: str = "cpu") -> None:
    """In memory only: bare forward, the fused six CAMs and pytorch-grad-cam's six, for models
    beyond CNN classifiers (segmentation nets with a region target, ViTs with their token
    reshape). Prints a Markdown table."""
    import pytorch_grad_cam as P

    from wsi_explain.explain.layers import tokens_to_grid

    classes = [P.GradCAM, P.GradCAMPlusPlus, P.XGradCAM, P.HiResCAM, P.LayerCAM, P.EigenCAM]
    rows = []
    for arch in archs:
        lm = load_model(arch, num_classes=2)
        fx = FusedExtractor(lm, methods=METHODS, tile_px=224, device=device)
        x = fx.normalise(imgs).contiguous(memory_format=torch.channels_last)
        module = lm.module.to(memory_format=torch.channels_last).eval()
        dev = x.device

        def bare_call():
            with torch.inference_mode(), fx.autocast():
                module(x)
            sync(dev)

        def fused_call():
            with fx:
                fx(x)

        r = interleaved({"bare": bare_call, "fused": fused_call}, reps, len(x))
        seg = lm.card.task == "segmentation"
        ref_module = lm.module.to(memory_format=torch.contiguous_format)
        layer = dict(ref_module.named_modules())[fx.target_layer]
        xc = x.contiguous()
        targets = pgc_targets(ref_module, xc, seg)
        vit = arch.startswith("timm:vit")
        t0 = time.perf_counter()
        for _ in range(pgc_reps):
            for cls in classes:
                cam = cls(model=ref_module, target_layers=[layer], reshape_transform=tokens_to_grid if vit else None)
                try:
                    cam(input_tensor=xc, targets=targets)
                finally:
                    cam.activations_and_grads.release()
        sync(dev)
        ref = pgc_reps * len(x) / (time.perf_counter() - t0)
        rows.append((arch, "region (predicted)" if seg else "class", r["bare"], r["fused"], ref))
        print(
            f"{arch}: bare {r['bare']:.1f}, fused {r['fused']:.1f}, pytorch-grad-cam x6 {ref:.2f} tiles/s", flush=True
        )
    print(
        f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, batch {BATCH}, 224 px, "
        f"device {device}{' ' + torch.cuda.get_device_name(device) if device.startswith('cuda') else ''}\n"
    )
    print(
        "| model | target | bare forward (tiles/s) | fused 6 CAMs (tiles/s) | fused time / bare | pytorch-grad-cam 6 CAMs (tiles/s) | fused speed-up vs pgc |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for arch, kind, bare, fus, ref in rows:
        print(f"| {arch} | {kind} | {bare:.1f} | {fus:.1f} | {bare / fus:.2f}x | {ref:.2f} | {fus / ref:.1f}x |")


def method_rows(archs: list[str], reps: int, imgs: np.ndarray, device: str = "cpu") -> None:
    """Where the fused pass's time goes: the pass with no CAM (forward with the hooks, embeddings and
    logits to the host), with one method at a time, and with all six, each against the bare forward
    in the same interleaved rounds. Prints a Markdown table of time / bare."""
    rows = []
    for arch in archs:
        lm = load_model(arch, num_classes=1000 if arch == "efficientnet_lite0" else 2)
        five = tuple(m for m in METHODS if m != "eigencam")
        sets = {
            "no CAM": (),
            **{m: (m,) for m in METHODS},
            "eigencam_signed": ("eigencam_signed",),
            "all six": METHODS,
            "five + eigencam_signed": (*five, "eigencam_signed"),
        }
        fxs = {k: FusedExtractor(lm, methods=v, tile_px=224, device=device) for k, v in sets.items()}
        first = next(iter(fxs.values()))
        x = first.normalise(imgs).contiguous(memory_format=torch.channels_last)
        module = lm.module.to(memory_format=torch.channels_last).eval()

        def bare_call():
            with torch.inference_mode(), first.autocast():
                module(x)
            sync(x.device)

        def call(fx):
            def run():
                with fx:
                    fx(x)

            return run

        r = interleaved({"bare": bare_call, **{k: call(fx) for k, fx in fxs.items()}}, reps, len(x))
        rows.append((arch, r))
        print(f"{arch}: " + ", ".join(f"{k} {v:.1f}" for k, v in r.items()) + " tiles/s", flush=True)
    names = ["no CAM", *METHODS, "eigencam_signed", "all six", "five + eigencam_signed"]
    print(f"\nfused pass time / bare forward, batch {BATCH}, 224 px, device {device}\n")
    print("| model | bare (tiles/s) | " + " | ".join(names) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in names) + " |")
    for arch, r in rows:
        print(f"| {arch} | {r['bare']:.0f} | " + " | ".join(f"{r['bare'] / r[k]:.2f}x" for k in names) + " |")


def pipeline(
    arch: str,
    slide: Path,
    tiles,
    methods,
    workers: int,
    repeats: int = 2,
    reader: str = "auto",
    device: str = "cpu",
    decoder: str = "auto",
) -> float:
    """tiles/s of the whole extraction of ``tiles`` (best of ``repeats``; includes worker start-up,
    the probe forward and the Zarr writes)."""
    cfg = ExtractConfig(
        arch=arch,
        num_classes=1000 if arch == "efficientnet_lite0" else 2,
        methods=methods,
        batch_size=BATCH,
        workers=workers,
        chunk_tiles=1024,
        device=device,
        reader=reader,
        decoder=decoder,
    )
    [fx] = build_extractors(cfg, 224)
    rates = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as d:
            rates.append(extract_slide(str(slide), tiles, Path(d) / "f.zarr", [fx], cfg, params="bench").tiles_per_s)
    return max(rates)


def memory_run(slide: Path, n_tiles: int) -> list[tuple[int, float]]:
    reader = tiling.OpenSlideReader(slide)
    tissue = tiling.detect_tissue(reader)
    grid = tiling.make_grid(reader, tissue, tiling.GridSpec(tile_px=32, mpp=0.5, min_tissue=0.0))
    tiles = grid.iloc[:n_tiles].reset_index(drop=True)
    cfg = ExtractConfig(
        arch="tests.tiny_models:tiny_cnn",
        num_classes=2,
        methods=METHODS,
        batch_size=256,
        workers=2,
        chunk_tiles=4096,
        device="cpu",
    )
    [fx] = build_extractors(cfg, 32)
    samples: list[tuple[int, float]] = []
    seen = [0]
    marks = {int(n_tiles * f) for f in (0.1, 0.25, 0.5, 0.75, 1.0)}

    def on_tiles(k: int) -> None:
        before = seen[0]
        seen[0] += k
        for m in sorted(marks):
            if before < m <= seen[0]:
                samples.append((m, rss_mb()))

    with tempfile.TemporaryDirectory() as d:
        extract_slide(str(slide), tiles, Path(d) / "f.zarr", [fx], cfg, params="mem", on_tiles=on_tiles)
    return samples


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--mem-only":
        import json

        mpp = float(sys.argv[sys.argv.index("--slide-mpp") + 1]) if "--slide-mpp" in sys.argv else 0.5
        scale = 0.25 / mpp
        tune_malloc()
        samples = memory_run(make_slide((int(30000 * scale), int(40000 * scale)), mpp=mpp), int(sys.argv[2]))
        samples.append(("peak (VmHWM)", rss_mb("VmHWM")))
        print(json.dumps(samples))
        return
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tiles", type=int, default=512, help="tiles for the pipeline runs")
    ap.add_argument("--reps", type=int, default=10, help="rounds of interleaved in-memory timings (a batch of 32 each)")
    ap.add_argument(
        "--slide-mpp",
        type=float,
        default=0.5,
        help="level-0 mpp of the generated slide: 0.5 (20x scan, tiles read at level 0) or 0.25 "
        "(40x scan, tiles read at level 0 and reduced 2x)",
    )
    ap.add_argument("--pgc-reps", type=int, default=2)
    ap.add_argument("--mem-tiles", type=int, default=100_000)
    ap.add_argument("--archs", nargs="+", default=["resnet18", "resnet50", "efficientnet_lite0"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument(
        "--cams-only",
        action="store_true",
        help="in-memory rows only (bare, fused, pytorch-grad-cam), e.g. --archs fcn_resnet50 timm:vit_small_patch16_224",
    )
    ap.add_argument("--per-method", action="store_true", help="in memory: the fused pass with each CAM alone")
    args = ap.parse_args()
    device = torch.device(args.device)
    tune_malloc()
    torch.set_num_threads(os.cpu_count() or 1)
    scale = 0.25 / args.slide_mpp
    slide = make_slide((int(30000 * scale), int(40000 * scale)), mpp=args.slide_mpp)
    reader = tiling.OpenSlideReader(slide)
    grid = tiling.make_grid(reader, tiling.detect_tissue(reader), tiling.GridSpec(tile_px=224, mpp=0.5))
    tiles = grid.iloc[: args.tiles].reset_index(drop=True)
    imgs = np.stack([tiling.read_tile(reader, tiles.iloc[i]) for i in range(BATCH)])
    if args.per_method:
        return method_rows(args.archs, args.reps, imgs, args.device)
    if args.cams_only:
        return cam_rows(args.archs, args.reps, args.pgc_reps, imgs, args.device)
    rows = []
    for arch in args.archs:
        lm = load_model(arch, num_classes=1000 if arch == "efficientnet_lite0" else 2)
        fx = FusedExtractor(lm, methods=METHODS, tile_px=224, device=args.device)
        x = fx.normalise(imgs).contiguous(memory_format=torch.channels_last)
        module = lm.module.to(memory_format=torch.channels_last).eval()

        def bare_call():
            with torch.inference_mode(), fx.autocast():
                module(x)
            sync(device)

        def fused_call():
            with fx:  # hooks only while the fused pass runs (registering them costs microseconds)
                fx(x)

        r = interleaved({"bare": bare_call, "fused": fused_call}, args.reps, len(x))
        bare, fus = r["bare"], r["fused"]
        # the pipeline over the slide, bracketed by bare timings over as many tiles
        n_batches = max(len(tiles) // BATCH, 1)
        b0 = bare_forward(module, x, n_batches, repeats=1, autocast=fx.autocast)
        with GpuBusy() as busy:
            pipe = pipeline(arch, slide, tiles, (), args.workers, device=args.device)
        pipe_os = pipeline(arch, slide, tiles, (), args.workers, device=args.device, decoder="openslide")
        with GpuBusy() as busy_cams:
            pipe_cams = pipeline(arch, slide, tiles, METHODS, args.workers, device=args.device)
        b1 = bare_forward(module, x, n_batches, repeats=1, autocast=fx.autocast)
        bare_pipe = (b0 + b1) / 2
        layer = dict(lm.module.named_modules())[fx.target_layer]
        ref = pgc(lm.module.to(memory_format=torch.contiguous_format), layer, x.contiguous(), args.pgc_reps)
        rows.append((arch, bare, bare_pipe, pipe, fus, pipe_cams, ref, pipe_os))
        print(
            f"{arch}: bare {bare:.1f} (around the pipeline {b0:.1f}, {b1:.1f}), pipeline {pipe:.1f} "
            f"(tiles decoded by OpenSlide {pipe_os:.1f}), fused {fus:.1f}, "
            f"pipeline+cams {pipe_cams:.1f}, pytorch-grad-cam x6 {ref:.2f} tiles/s",
            flush=True,
        )
        if device.type == "cuda":
            print(
                f"{arch}: GPU busy during the pipeline (nvidia-smi mean, %): emb + logits {busy.mean}, "
                f"+ 6 CAMs {busy_cams.mean}; pipeline / bare {pipe / bare_pipe:.2f}",
                flush=True,
            )
    mem = []
    if args.mem_tiles:  # in a fresh process, so that the models above do not inflate its RSS
        import json
        import subprocess

        out = subprocess.run(
            [sys.executable, __file__, "--mem-only", str(args.mem_tiles), "--slide-mpp", str(args.slide_mpp)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        mem = json.loads(out.strip().splitlines()[-1])
    print()
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, batch {BATCH}, 224 px, channels_last, workers {args.workers}, "
        f"slide level-0 mpp {args.slide_mpp}, {len(tiles)} tiles per pipeline run"
    )
    print(
        "| model | bare forward (tiles/s) | fused 6 CAMs (tiles/s) | fused time / bare | pytorch-grad-cam 6 CAMs (tiles/s) | "
        "fused speed-up vs pgc | bare around the pipeline (tiles/s) | pipeline, emb + logits (tiles/s) | pipeline / bare | "
        "pipeline + 6 CAMs (tiles/s) | pipeline, tiles decoded by OpenSlide (tiles/s) | its / bare |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for arch, bare, bare_pipe, pipe, fus, pipe_cams, ref, pipe_os in rows:
        print(
            f"| {arch} | {bare:.1f} | {fus:.1f} | {bare / fus:.2f}x | {ref:.2f} | {fus / ref:.1f}x | {bare_pipe:.1f} | "
            f"{pipe:.1f} | {pipe / bare_pipe:.2f} | {pipe_cams:.1f} | {pipe_os:.1f} | {pipe_os / bare_pipe:.2f} |"
        )
    if mem:
        print()
        print("| tiles done (tiny CNN, 32 px, 6 CAMs) | RSS (MB) |")
        print("| --- | --- |")
        for n, mb in mem:
            print(f"| {n} | {mb:.0f} |")
        print("(the 32 px grid at 0.5 µm with min_tissue 0 has 292,000 positions; the first --mem-tiles are used)")


if __name__ == "__main__":
    main()
