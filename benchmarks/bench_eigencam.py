"""EigenCAM benchmark: cost per tile of each way to compute it, and how stable its sign is.

Usage::

    .venv/bin/python benchmarks/bench_eigencam.py [--tiles 96] [--arch efficientnet_lite0]

Tiles of real H&E (``data/CMU-1-Small-Region.svs``, 224 px at 0.5 µm; generated H&E-like
texture when the slide is absent) go through the model once; its target-layer activations
(N, C, 7, 7) are then fed to:

1. cost, ms per tile on one thread (median of interleaved rounds): pytorch-grad-cam's
   ``get_2d_projection`` (full SVD), a direct ``np.linalg.svd(full_matrices=False)`` per tile (our
   previous route), :func:`wsi_explain.explain.cams.first_component` (our route: the triangle of a QR, then its
   SVD), and ``eigencam_signed`` (batched Gram eigendecomposition in float64);
2. how often the reference's sign is the one Seg-Eigen-CAM's rule rejects (the ReLU'd map then
   shows the other end of the first component);
3. sign stability: the share of tiles whose map changes sign (a) between the activations of the
   channels_last forward (ours) and of the contiguous forward (what pytorch-grad-cam computes on
   the same model), (b) under relative noise of 1e-6 on the activations, and (c) the same on 300
   unstructured random activations (no dominant component, where the sign is fragile); for ``eigencam`` (the
   reference's LAPACK sign) and ``eigencam_signed`` (Seg-Eigen-CAM's sign rule).

Prints Markdown for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def he_tiles(n: int) -> tuple[np.ndarray, str]:
    """``n`` (224, 224, 3) uint8 tiles of real H&E when the slide is there, else generated texture."""
    import tiling
    from wsi_explain.demo.data import find_demo_source

    src = find_demo_source()
    if src is not None:
        reader = tiling.OpenSlideReader(src)
        grid = tiling.make_grid(
            reader, tiling.detect_tissue(reader), tiling.GridSpec(tile_px=224, mpp=0.5, overlap=112, min_tissue=0.5)
        )
        idx = np.linspace(0, len(grid) - 1, min(n, len(grid))).astype(int)
        return np.stack([tiling.read_tile(reader, grid.iloc[i]) for i in idx]), f"{src.name}, {len(idx)} tiles"
    from tests.conftest import synthetic_he

    side = int(np.ceil(np.sqrt(n)))
    img, _ = synthetic_he(224 * side, 224 * side, seed=5)
    tiles = [img[r * 224 : (r + 1) * 224, c * 224 : (c + 1) * 224] for r in range(side) for c in range(side)]
    return np.stack(tiles[:n]), f"generated H&E-like texture, {n} tiles"


def layer_activations(arch: str, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """Target-layer activations from the channels_last forward and from the contiguous one."""
    from wsi_explain.explain.fused import FusedExtractor
    from wsi_explain.explain.layers import find_module
    from wsi_explain.explain.load import load_model

    lm = load_model(arch, num_classes=1000 if arch == "efficientnet_lite0" else 2)
    fx = FusedExtractor(lm, methods=("eigencam",), tile_px=224, device="cpu")
    layer = find_module(lm.module, fx.target_layer)
    x = fx.normalise(tiles)
    out = []
    for fmt in (torch.channels_last, torch.contiguous_format):
        module = lm.module.to(memory_format=fmt)
        parts: list[np.ndarray] = []
        h = layer.register_forward_hook(lambda m, i, o: parts.append(o.detach().float().numpy().copy()))
        try:
            with torch.inference_mode():
                for s in range(0, len(x), 32):
                    module(x[s : s + 32].contiguous(memory_format=fmt))
        finally:
            h.remove()
        out.append(np.concatenate(parts))
    cl, co = out
    return cl, co, fx.target_layer


def main() -> None:
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection
    from threadpoolctl import threadpool_limits

    from wsi_explain.explain.cams import FUSED_CAMS, first_component

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tiles", type=int, default=96)
    ap.add_argument("--arch", default="efficientnet_lite0")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    tiles, source = he_tiles(args.tiles)
    a, a_contig, layer = layer_activations(args.arch, tiles)
    n, c, h, w = a.shape

    def centred(t):  # one tile's (hw, C) matrix, centred as the reference does
        f = t.reshape(c, -1).T
        return f - f.mean(axis=0)

    def direct(v):  # the previous route: one full_matrices=False SVD per tile
        out = np.empty((len(v), h * w), np.float32)
        for i, t in enumerate(v):
            f = centred(t)
            _, _, vt = np.linalg.svd(f, full_matrices=False)
            out[i] = f @ vt[0]
        return out

    routes = {
        "pytorch-grad-cam get_2d_projection (full SVD per tile)": lambda v: get_2d_projection(v),
        "direct SVD per tile, full_matrices=False (previous route)": direct,
        "first_component: QR triangle, then its SVD (eigencam now)": lambda v: first_component(
            v.reshape(len(v), c, h * w).transpose(0, 2, 1)
        ),
        "Gram eigendecomposition, batched, float64 (eigencam_signed)": lambda v: FUSED_CAMS["eigencam_signed"](
            torch.from_numpy(v), None
        ),
    }
    torch.set_num_threads(1)  # one thread for every route
    times = {k: [] for k in routes}
    with threadpool_limits(limits=1, user_api="blas"):
        for fn in routes.values():
            fn(a[:4])
        names = list(routes)
        for r in range(args.rounds):
            for k in names[r % len(names) :] + names[: r % len(names)]:
                t0 = time.perf_counter()
                routes[k](a)
                times[k].append((time.perf_counter() - t0) / n * 1000)
    torch.set_num_threads(os.cpu_count() or 1)

    rng = np.random.default_rng(0)
    noisy = a * (1 + 1e-6 * rng.standard_normal(a.shape)).astype(np.float32)

    # activations with no dominant structure (small singular-value gaps): where the sign is fragile
    rand = np.maximum(rng.standard_normal((300, c, h, w)), 0).astype(np.float32)
    rand_noisy = rand * (1 + 1e-6 * rng.standard_normal(rand.shape)).astype(np.float32)

    def flips(method: str, first: np.ndarray, other: np.ndarray) -> float:
        p, q = (FUSED_CAMS[method](torch.from_numpy(v), None).numpy().reshape(len(v), -1) for v in (first, other))
        return float(((p * q).sum(1) < 0).mean())

    def scipy_disagree(v: np.ndarray) -> float:
        import scipy.linalg

        out = []
        for t in v:
            f = centred(t)
            p = f @ np.linalg.svd(f, full_matrices=True)[2][0]
            q = f @ scipy.linalg.svd(f, full_matrices=True, lapack_driver="gesdd")[2][0]
            out.append(p @ q < 0)
        return float(np.mean(out))

    ref = get_2d_projection(a).reshape(n, -1)
    ours = first_component(a.reshape(n, c, h * w).transpose(0, 2, 1))
    agree = float(((ref * ours).sum(1) > 0).mean())
    signed = FUSED_CAMS["eigencam_signed"](torch.from_numpy(a), None).numpy().reshape(n, -1)
    inverted = float(((ref * signed).sum(1) < 0).mean())

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}, torch {torch.__version__}; "
        f"{args.arch} at {layer!r}, activations {a.shape}; {source}"
    )
    print()
    print("| route | ms per tile, one thread (median) |")
    print("| --- | --- |")
    for k, v in times.items():
        print(f"| {k} | {np.median(v):.2f} |")
    print()
    print(f"first_component vs pytorch-grad-cam on the same activations: same sign on {agree:.1%} of tiles")
    print(
        f"tiles where the reference's sign is the one the sign rule rejects (its most negative value "
        f"outweighs its most positive: plain EigenCAM, ReLU'd, shows the other end of the component): {inverted:.1%}"
    )
    print(
        f"the reference computed with SciPy's LAPACK instead of NumPy's (gesdd, another OpenBLAS build): "
        f"other sign on {scipy_disagree(a):.1%} of these tiles, {scipy_disagree(rand):.1%} of the random activations"
    )
    print()
    print(
        "| method | sign flips, channels_last vs contiguous forward | sign flips under 1e-6 relative noise | "
        "the same, 300 unstructured random activations (ReLU'd normal) |"
    )
    print("| --- | --- | --- | --- |")
    for m in ("eigencam", "eigencam_signed"):
        print(f"| {m} | {flips(m, a, a_contig):.1%} | {flips(m, a, noisy):.1%} | {flips(m, rand, rand_noisy):.1%} |")


if __name__ == "__main__":
    main()
