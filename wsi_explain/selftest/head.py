"""The self-test's shortcut model: the run's own model with its classifier refitted on the planted
cohort's synthetic labels, so that it leans on whatever separates the labels: the plants.

The trunk stays frozen; a logistic regression on the classifier's input (the embedding) of every
training tile, each labelled with its slide's label (weak supervision, as slide labels are in
practice), becomes a new 2-class ``nn.Linear`` in the classifier's place. The training tiles are a
cohort of their own (other source tiles, other plants, :func:`wsi_explain.selftest.cohort.training_tiles`),
not the audited one: a head fitted on the audited tiles memorises them, and its predictions there
follow the slide labels rather than the plants. Trained apart, the model carries the shortcut to
unseen slides as a deployed model does. The model is saved as a state dict
with a model card, so the extraction stage loads it like any checkpoint (``weights_only=True``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from wsi_explain.core.errors import WsiExplainError

__all__ = ["fit_shortcut_model"]

logger = logging.getLogger(__name__)


def _embeddings(fx, images: np.ndarray, *, batch_size: int) -> np.ndarray:
    """(n, D) float32 classifier inputs of (n, px, px, 3) uint8 tiles."""
    out = []
    with fx:
        for i in range(0, len(images), batch_size):
            out.append(np.asarray(fx(fx.normalise(images[i : i + batch_size])).embeddings, np.float32))
    return np.concatenate(out)


def fit_shortcut_model(
    images: np.ndarray, labels: np.ndarray, base: dict, out_dir: Path, *, seed: int = 0, batch_size: int = 32
) -> dict:
    """Refit the classifier of the run's model on training tiles and save it.

    Parameters
    ----------
    images : (n, px, px, 3) uint8
        Training tiles at the model's input size (not modified).
    labels : (n,) int
        Their slide labels (0/1).
    base : dict
        The original run's extraction config (``arch``, ``weights``, ``card``, ``trust_checkpoint``...).
    out_dir : Path
        Gets ``shortcut.pt`` and its card ``shortcut.yaml``.

    Returns
    -------
    dict with ``weights`` (path), ``train_accuracy``, ``n_tiles``, ``classifier`` (the replaced
    layer's name). An existing ``shortcut.pt`` with its ``fit.json`` is reused (reruns are no-ops).
    """
    import json

    import torch
    import yaml
    from sklearn.linear_model import LogisticRegression
    from torch import nn

    from wsi_explain.explain.fused import FusedExtractor
    from wsi_explain.explain.layers import default_classifier
    from wsi_explain.explain.load import load_model

    fit_json = out_dir / "fit.json"
    if fit_json.exists() and (out_dir / "shortcut.pt").exists():
        return json.loads(fit_json.read_text())
    lm = load_model(
        base["arch"],
        weights=base.get("weights"),
        num_classes=base.get("num_classes"),
        card=base.get("card"),
        trust_checkpoint=bool(base.get("trust_checkpoint")),
    )
    if base["arch"] == "torchscript":
        raise WsiExplainError("the self-test refits the model's classifier; a TorchScript model cannot be rebuilt")
    tile_px = lm.card.tile_px or 224
    fx = FusedExtractor(lm, methods=(), tile_px=tile_px)
    if len(np.unique(labels)) < 2:
        raise WsiExplainError("the self-test's training tiles need both labels")
    X, y = _embeddings(fx, images, batch_size=batch_size), np.asarray(labels, int)
    clf = LogisticRegression(max_iter=2000, C=1.0, random_state=seed).fit(X, y)
    acc = float(clf.score(X, y))
    logger.info("self-test head: %d tiles, training accuracy %.3f", len(y), acc)
    name = default_classifier(lm.module)
    parent_name, _, attr = name.rpartition(".")
    parent = lm.module.get_submodule(parent_name) if parent_name else lm.module
    head = nn.Linear(X.shape[1], 2)
    with torch.no_grad():
        w = torch.tensor(clf.coef_, dtype=torch.float32)
        b = torch.tensor(clf.intercept_, dtype=torch.float32)
        head.weight.copy_(torch.cat([-w / 2, w / 2]))
        head.bias.copy_(torch.cat([-b / 2, b / 2]))
    setattr(parent, attr, head)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / "shortcut.pt"
    torch.save(lm.module.state_dict(), weights)
    card = {"class_names": ["negative", "positive"], "tile_px": tile_px, "mean": list(lm.card.mean)}
    card.update({"std": list(lm.card.std), "mpp": lm.card.mpp})
    weights.with_suffix(".yaml").write_text(yaml.safe_dump(card))
    fit = {"weights": str(weights), "train_accuracy": acc, "n_tiles": int(len(y)), "classifier": name}
    fit_json.write_text(json.dumps(fit))
    return fit
