"""The demo's classifier: EfficientNet-Lite0 (ImageNet trunk, offline) with a 2-class head fitted
on the demo cohort's slide labels.

The head is a logistic regression on the trunk's embeddings of every tile of the training slides
(``split`` other than ``test`` in the cohort CSV), each tile labelled with its slide's label (weak
supervision, as slide-level labels are in practice). Its weights go into
the model's ``fc`` layer and the whole model is saved as a state dict with a model card, so the
pipeline loads it like any user checkpoint (``weights_only=True``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

__all__ = ["train_demo_model"]

logger = logging.getLogger(__name__)


def train_demo_model(
    run, out_dir: Path, *, seed: int = 0, workers: int = 2, batch_size: int = 32, mpp: float = 2.0
) -> Path:
    """Fit the demo head on the tiled slides of ``run`` and save ``out_dir/demo_effnet.pt`` (+ card).

    Returns the weights path; an existing file is reused (the demo's reruns are no-ops).
    """
    import torch
    import yaml
    from sklearn.linear_model import LogisticRegression

    from wsi_explain.explain.fused import FusedExtractor
    from wsi_explain.explain.load import load_model
    from wsi_explain.io.loader import TileDataset, tile_batches
    from wsi_explain.io.tile_table import read_tile_table

    out_dir = Path(out_dir)
    weights = out_dir / "demo_effnet.pt"
    if weights.exists():
        return weights
    lm = load_model("efficientnet_lite0", num_classes=2)
    fx = FusedExtractor(lm, methods=(), tile_px=224)
    X, y = [], []
    for sid, rec in run.stage("tile")["slides"].items():
        if rec.get("status") != "done":
            continue
        label = (rec.get("meta") or {}).get("label")
        if label in (None, "") or (rec.get("meta") or {}).get("split") == "test":  # held-out slides stay unseen
            continue
        tiles, meta = read_tile_table(run.slide_dir(sid) / "tiles.parquet")
        ds = TileDataset(meta["slide_path"], tiles, mpp=meta.get("level0_mpp"))
        batches = [list(range(i, min(i + batch_size, len(tiles)))) for i in range(0, len(tiles), batch_size)]
        with fx:
            for _, imgs, ok, _ in tile_batches(ds, batches, reader="threads", workers=workers, pin=False):
                out = fx(fx.normalise(imgs))
                X.append(out.embeddings[ok.numpy().astype(bool)])
                y.append(np.full(int(ok.sum()), int(float(label))))
    X, y = np.concatenate(X), np.concatenate(y)
    if len(np.unique(y)) < 2:
        raise ValueError("the demo cohort needs slides of both labels to fit its head")
    clf = LogisticRegression(max_iter=2000, C=0.1, random_state=seed).fit(X, y)
    logger.info("demo head: %d tiles, training accuracy %.3f", len(y), clf.score(X, y))
    with torch.no_grad():
        w = torch.tensor(clf.coef_, dtype=torch.float32)  # (1, D) for binary
        b = torch.tensor(clf.intercept_, dtype=torch.float32)
        lm.module.fc.weight.copy_(torch.cat([-w / 2, w / 2]))
        lm.module.fc.bias.copy_(torch.cat([-b / 2, b / 2]))
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_suffix(".tmp")
    torch.save(lm.module.state_dict(), tmp)
    tmp.replace(weights)
    weights.with_suffix(".yaml").write_text(
        yaml.safe_dump({"class_names": ["negative", "positive"], "tile_px": 224, "mpp": mpp})
    )
    return weights
