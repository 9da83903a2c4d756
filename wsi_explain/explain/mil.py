"""Slide-level multiple-instance (MIL) heads over stored tile embeddings.

A MIL head turns a slide's bag of tile embeddings (N, D) into slide logits (K,). Built in:

- ``abmil``: attention pooling (Ilse et al. 2018): ``a_i = w^T tanh(V h_i)``, softmax over the
  bag, ``z = sum_i a_i h_i``, ``logits = W z + b``; an optional first layer ``h = ReLU(F x)``;
- ``gated_abmil``: the gated attention of the same paper, ``a_i = w^T (tanh(V h_i) * sigm(U h_i))``;
- ``clam_sb``: CLAM's single-branch head (Lu et al. 2021) at inference: ``h = ReLU(F x)`` (512),
  gated attention (256), a linear bag classifier (the instance classifiers only train).

Every head returns the logits and keeps the raw attention scores of its last call
(``last_attention``, (N,), before the softmax). A user's own head loads as an entry point
``package.module:factory`` (called with ``in_dim`` and ``n_classes``) or a TorchScript file; its
forward takes (N, D) and returns (K,) or (1, K) logits, or ``(logits, attention)``. State dicts
load with ``weights_only=True``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from wsi_explain.explain.card import ModelError

__all__ = ["MIL_HEADS", "ABMIL", "MilModel", "load_mil_head", "fit_mil_head"]


class ABMIL(nn.Module):
    """Attention-based MIL pooling (plain or gated) with an optional first layer and a linear head.

    Parameters
    ----------
    in_dim : int
        Embedding size D of the bag.
    n_classes : int
    hidden : int or None
        Width of the first layer ``ReLU(F x)``; None feeds the embeddings directly.
    attn_dim : int
        Width of the attention network.
    gated : bool
        Gated attention (``tanh * sigmoid``).
    """

    def __init__(
        self, in_dim: int, n_classes: int = 2, *, hidden: int | None = None, attn_dim: int = 128, gated: bool = False
    ) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.fc = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU()) if hidden else nn.Identity()
        d = hidden or in_dim
        self.attn_v = nn.Linear(d, attn_dim)
        self.attn_u = nn.Linear(d, attn_dim) if gated else None
        self.attn_w = nn.Linear(attn_dim, 1)
        self.classifier = nn.Linear(d, n_classes)
        self.last_attention: torch.Tensor | None = None

    def attention_scores(self, h: torch.Tensor) -> torch.Tensor:
        """(N,) raw attention scores of the (N, d) features ``h``."""
        a = torch.tanh(self.attn_v(h))
        if self.attn_u is not None:
            a = a * torch.sigmoid(self.attn_u(h))
        return self.attn_w(a)[:, 0]

    def forward(self, bag: torch.Tensor) -> torch.Tensor:
        h = self.fc(bag)
        scores = self.attention_scores(h)
        self.last_attention = scores.detach()
        z = torch.softmax(scores, 0) @ h
        return self.classifier(z)


def _abmil(in_dim: int, n_classes: int) -> ABMIL:
    return ABMIL(in_dim, n_classes)


def _gated(in_dim: int, n_classes: int) -> ABMIL:
    return ABMIL(in_dim, n_classes, gated=True)


def _clam_sb(in_dim: int, n_classes: int) -> ABMIL:
    return ABMIL(in_dim, n_classes, hidden=512, attn_dim=256, gated=True)


#: built-in heads: name -> factory(in_dim, n_classes)
MIL_HEADS = {"abmil": _abmil, "gated_abmil": _gated, "clam_sb": _clam_sb}


class MilModel(nn.Module):
    """A loaded MIL head: ``forward(bag (N, D)) -> logits (K,)``, ``attention`` the raw scores of
    the last call (None when the head has none), ``in_dim`` and ``n_classes`` checked at load."""

    def __init__(self, head: nn.Module, *, in_dim: int, n_classes: int, name: str) -> None:
        super().__init__()
        self.head, self.in_dim, self.n_classes, self.name = head, in_dim, n_classes, name
        self.attention: torch.Tensor | None = None

    def forward(self, bag: torch.Tensor) -> torch.Tensor:
        if bag.ndim != 2 or bag.shape[1] != self.in_dim:
            raise ModelError(
                f"{self.name}: a bag must be (N, {self.in_dim}) embeddings, got {tuple(bag.shape)}"
                " (was the head trained on another embedding layer?)"
            )
        if bag.shape[0] == 0:
            raise ModelError(f"{self.name}: an empty bag has no slide score")
        out = self.head(bag)
        att = None
        if isinstance(out, tuple):
            out, att = out[0], out[1]
        elif getattr(self.head, "last_attention", None) is not None:
            att = self.head.last_attention
        self.attention = None if att is None else att.detach().reshape(-1)
        return out.reshape(-1)


def load_mil_head(
    spec: str, *, in_dim: int, n_classes: int = 2, weights: str | Path | None = None, trust: bool = False
) -> MilModel:
    """Load a MIL head: a built-in name (:data:`MIL_HEADS`), an entry point ``package.module:factory``
    or a TorchScript file (``.pt``/``.ts`` path); ``weights`` a state dict for the first two.

    Raises
    ------
    ModelError
        Unknown head, weights that do not fit, or logits of the wrong size on a test bag.
    """
    from wsi_explain.explain.load import _entry_point, load_state_dict

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if spec in MIL_HEADS:
            head = MIL_HEADS[spec](in_dim, n_classes)
        elif ":" in spec:
            head = _entry_point(spec, n_classes, in_dim=in_dim)
        elif Path(spec).is_file():
            try:
                head = torch.jit.load(spec, map_location="cpu")
            except RuntimeError as exc:
                raise ModelError(f"{spec}: not a TorchScript MIL head ({exc})") from exc
        else:
            raise ModelError(f"unknown MIL head {spec!r}: one of {sorted(MIL_HEADS)}, package.module:factory or a file")
    if weights is not None and not isinstance(head, torch.jit.ScriptModule):
        try:
            head.load_state_dict(load_state_dict(Path(weights), trust=trust))
        except RuntimeError as exc:
            raise ModelError(f"{weights}: weights do not fit the MIL head {spec} ({str(exc)[:300]})") from exc
    model = MilModel(head.eval(), in_dim=in_dim, n_classes=n_classes, name=spec).eval()
    with torch.no_grad():
        k = model(torch.zeros(3, in_dim)).numel()
    if k != n_classes:
        raise ModelError(f"MIL head {spec}: gives {k} logits for {n_classes} classes")
    return model


def fit_mil_head(
    bags: list,
    labels,
    *,
    head: str = "abmil",
    n_classes: int = 2,
    epochs: int = 40,
    lr: float = 1e-3,
    seed: int = 0,
) -> MilModel:
    """Fit a built-in head on bags with slide labels (Adam, cross-entropy, one bag per step, seeded):
    a small helper to try the MIL audit on a cohort that has no trained head, not a training recipe.

    Parameters
    ----------
    bags : list of (N_i, D) float32 arrays (a slide's tile embeddings each).
    labels : (n_slides,) int class per bag.

    Returns
    -------
    MilModel in eval mode; ``model.head.state_dict()`` is what ``--mil-weights`` loads.
    """
    import numpy as np

    if len(bags) != len(labels) or not len(bags):
        raise ModelError(f"{len(bags)} bags for {len(labels)} labels")
    dim = int(np.asarray(bags[0]).shape[1])
    model = load_mil_head(head, in_dim=dim, n_classes=n_classes)
    xs = [torch.from_numpy(np.ascontiguousarray(b, np.float32)) for b in bags]
    ys = torch.as_tensor(np.asarray(labels, np.int64))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        for i in torch.randperm(len(xs), generator=gen).tolist():
            loss = nn.functional.cross_entropy(model(xs[i])[None], ys[i : i + 1])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()
