"""The captum adapters' cost: Integrated Gradients, GradientShap, Occlusion and SmoothGrad through
``wsi_explain.explain.attributors`` against a direct captum call with the same parameters, on the
same tiles, interleaved.

Reports per method: forwards per tile (images the model saw, counted by a forward hook), the
median wall time of our call and of captum's over the rounds, and their ratio (the adapter's
overhead; the issue's bound is 1.05). Also Integrated Gradients' completeness error at the
default 50 steps.

Usage::

    .venv/bin/python benchmarks/bench_attributors.py [--arch resnet18] [--tiles 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _counter(model: torch.nn.Module) -> list[int]:
    seen = [0]
    model.register_forward_hook(lambda m, i, o: seen.__setitem__(0, seen[0] + int(i[0].shape[0])))
    return seen


def _direct(name: str, model, x: torch.Tensor, t: torch.Tensor, max_batch: int):
    """captum called as a user would, with the adapter's parameters (its internal batching too)."""
    import captum.attr as ca

    x = x.clone().requires_grad_(True)
    n = len(x)
    if name == "integratedgradients":
        return ca.IntegratedGradients(model).attribute(
            x, baselines=torch.zeros_like(x), target=t, n_steps=50, internal_batch_size=max_batch
        )
    if name == "gradientshap":
        torch.manual_seed(0)
        base = torch.randn((8,) + tuple(x.shape[1:])) * 0.5
        k, out, done = max(1, max_batch // n), 0, 0
        while done < 20:
            m = min(k, 20 - done)
            out = out + ca.GradientShap(model).attribute(x, baselines=base, n_samples=m, target=t) * m
            done += m
        return out / 20
    if name == "occlusion":
        w = x.shape[-1] // 8
        return ca.Occlusion(model).attribute(
            x,
            target=t,
            sliding_window_shapes=(3, w, w),
            strides=(3, w, w),
            perturbations_per_eval=max(1, max_batch // n),
        )
    if name == "smoothgrad":
        return ca.NoiseTunnel(ca.Saliency(model)).attribute(
            x, target=t, nt_type="smoothgrad", nt_samples=16, nt_samples_batch_size=max(1, max_batch // n), stdevs=0.15
        )
    raise ValueError(name)


def main() -> None:
    import torchvision

    from wsi_explain.explain.attributors import make_attributor

    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--tiles", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-batch", type=int, default=32)
    a = ap.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.get_model(a.arch, weights=None, num_classes=2).eval()
    seen = _counter(model)
    x = torch.randn(a.tiles, 3, 224, 224)
    t = model(x).argmax(1).detach()
    rows = []
    for name in ("integratedgradients", "gradientshap", "occlusion", "smoothgrad"):
        # IG's refinement off (max_steps = n_steps): the same 50 steps as the direct call
        kw = {"attribute_kwargs": {"n_steps": 50, "max_steps": 50}} if name == "integratedgradients" else {}
        ours = make_attributor(name, model, max_batch=a.max_batch, **kw)
        ours.attribute(x[:1], targets=t[:1])  # warm-up
        t_ours, t_captum, fw = [], [], 0
        for _ in range(a.rounds):  # interleaved, so that machine noise hits both alike
            seen[0] = 0
            t0 = time.perf_counter()
            ours.attribute(x, targets=t)
            t_ours.append(time.perf_counter() - t0)
            fw = seen[0] / a.tiles
            t0 = time.perf_counter()
            _direct(name, model, x, t, a.max_batch)
            t_captum.append(time.perf_counter() - t0)
        mo, mc = statistics.median(t_ours), statistics.median(t_captum)
        extra = ""
        if name == "integratedgradients":
            extra = f"completeness error max {float(np.max(ours.last_delta)):.3f}"
        rows.append((name, fw, mo, mc, mo / mc, extra))
    print(f"## captum adapters ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)\n")
    print(
        f"Command: `.venv/bin/python benchmarks/bench_attributors.py --arch {a.arch} --tiles {a.tiles} --rounds {a.rounds}`\n"
    )
    print("| method | forwards per tile | ours s (median) | captum s (median) | ours / captum | note |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for name, fw, mo, mc, r, extra in rows:
        print(f"| {name} | {fw:.1f} | {mo:.2f} | {mc:.2f} | {r:.3f} | {extra} |")


if __name__ == "__main__":
    main()
