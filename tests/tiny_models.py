"""Small models for fast tests (entry points ``tests.tiny_models:<factory>``)."""

from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    """Four conv blocks (each ReLU used once), global pooling and a linear classifier."""

    def __init__(self, num_classes: int = 2, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, stride=2, padding=1),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1),
            nn.BatchNorm2d(4 * w),
            nn.ReLU(),
            nn.Conv2d(4 * w, 4 * w, 3, stride=1, padding=1),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def tiny_cnn(num_classes: int = 2) -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG
        torch.manual_seed(0)
        m = TinyCNN(num_classes)
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):  # non-trivial running statistics
                bn.running_mean.uniform_(-0.1, 0.1)
                bn.running_var.uniform_(0.5, 1.5)
    return m


class NaNOnBright(TinyCNN):
    """Outputs NaN logits for tiles whose mean normalised intensity is above ``threshold``."""

    threshold = 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        bright = x.mean((1, 2, 3)) > self.threshold
        return torch.where(bright[:, None], torch.full_like(out, float("nan")), out)


def nan_on_bright(num_classes: int = 2) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return NaNOnBright(num_classes)


class SlowCNN(TinyCNN):
    """TinyCNN that sleeps per batch, so a test can kill a run part way."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time

        time.sleep(0.15)
        return super().forward(x)


def slow_cnn(num_classes: int = 2) -> nn.Module:
    m = tiny_cnn(num_classes)
    with torch.random.fork_rng(devices=[]):
        s = SlowCNN(num_classes)
    s.load_state_dict(m.state_dict())
    return s


class Unsafe:
    """An arbitrary object inside a checkpoint: loading it needs full unpickling."""

    def __init__(self) -> None:
        self.note = "trust me"


def fixed_two_classes() -> nn.Module:
    """Always two outputs, whatever num_classes the user claims."""
    return tiny_cnn(2)


def tiny_vit(num_classes: int = 2) -> nn.Module:
    """torchvision's VisionTransformer at toy size: 64 px input, 16 px patches (a 4 x 4 grid plus
    the class token), 2 blocks of width 32; seeded."""
    from torchvision.models.vision_transformer import VisionTransformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = VisionTransformer(
            image_size=64, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=num_classes
        )
        nn.init.normal_(m.heads.head.weight, std=0.2)  # torchvision zero-inits the head: no gradient otherwise
    return m.eval()


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyRegisterViT(nn.Module):
    """A DINOv2-style ViT at toy size: class token and 4 register tokens before a 4 x 4 patch grid
    (timm's naming: ``blocks.<i>.norm1``, ``norm``, ``head``)."""

    def __init__(self, num_classes: int = 2, d: int = 32, registers: int = 4) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, d, 16, stride=16)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.1)
        self.reg = nn.Parameter(torch.randn(1, registers, d) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, 16, d) * 0.1)
        self.blocks = nn.Sequential(_Block(d), _Block(d))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        n = p.shape[0]
        t = torch.cat([self.cls.expand(n, -1, -1), self.reg.expand(n, -1, -1), p], 1)
        return self.head(self.norm(self.blocks(t))[:, 0])


def tiny_register_vit(num_classes: int = 2) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return TinyRegisterViT(num_classes).eval()


class _MeanPool(nn.Module):
    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, num_classes)

    def forward(self, bag: torch.Tensor) -> torch.Tensor:
        return self.fc(bag.mean(0))


def mean_pool_head(num_classes: int = 2, in_dim: int = 16) -> nn.Module:
    """A MIL head without attention (mean pooling), as a user's entry point would be."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _MeanPool(in_dim, num_classes)


class TinySeg(nn.Module):
    """A toy segmentation net: (N, 3, H, W) -> (N, K, H, W) per-pixel logits (an encoder at stride
    4, a 1 x 1 classifier, bilinear upsampling back to the input)."""

    def __init__(self, num_classes: int = 2, w: int = 8) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, w, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.classifier = nn.Conv2d(2 * w, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.classifier(self.encoder(x))
        return nn.functional.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)


def tiny_seg(num_classes: int = 2) -> nn.Module:
    """Seeded; the last class reads every feature positively (the others negatively), so it is
    predicted everywhere and its gradient CAMs are not cut to zero by their ReLU."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = TinySeg(num_classes)
        with torch.no_grad():
            w = m.classifier.weight
            w.copy_(-w.abs())
            w[-1].abs_()
    return m
