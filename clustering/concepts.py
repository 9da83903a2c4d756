"""Concept discovery: NMF on spatial activations across the cohort (CRAFT/ACE-style prototypes).

Each spatial position of each tile's post-ReLU activation map is a non-negative C-vector. NMF
with K components on a sample of positions from the whole cohort gives K concept prototypes
(K, C); projecting every tile's positions on them (non-negative least squares) gives its concept
maps (K, h, w) and weights (K,).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ConceptModel",
    "fit_concepts",
    "concept_maps",
    "concept_prediction_association",
    "concept_cam_correlation",
    "sample_positions",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConceptModel:
    """K prototypes in activation space.

    Attributes
    ----------
    components : (K, C) float32, non-negative, each row of unit L2 norm
    reconstruction_error : float
        Relative Frobenius error on the fitting sample.
    n_positions : int
    n_iter : int
        Iterations the NMF solver ran.
    converged : bool
        Whether it stopped on its tolerance rather than at ``max_iter``.
    """

    components: np.ndarray
    reconstruction_error: float
    n_positions: int
    n_iter: int = 0
    converged: bool = True

    @property
    def k(self) -> int:
        return len(self.components)


def sample_positions(activations: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` random spatial positions (rows of C values) from activations (m, C, h, w)."""
    m, c, h, w = activations.shape
    flat = np.moveaxis(activations, 1, -1).reshape(-1, c)
    idx = rng.choice(len(flat), size=min(n, len(flat)), replace=False)
    return np.asarray(flat[idx], np.float32)


def fit_concepts(positions: np.ndarray, k: int, *, seed: int = 0, max_iter: int = 400) -> ConceptModel:
    """Fit NMF with ``k`` components on positions (n, C) >= 0.

    Components are normalised to unit L2 norm (the weights absorb the scale) and ordered by
    their total weight on the sample, largest first.
    """
    from sklearn.decomposition import NMF

    X = np.asarray(positions, np.float32)
    if (X < 0).any():
        raise ValueError("NMF needs non-negative activations (post-ReLU); got negative values")
    if not 1 <= k <= min(X.shape):
        raise ValueError(f"k must be between 1 and {min(X.shape)}, got {k}")
    from sklearn.exceptions import ConvergenceWarning

    nmf = NMF(n_components=k, init="nndsvda", random_state=seed, max_iter=max_iter, tol=1e-5)
    with warnings.catch_warnings():
        # this fit only: stopping at max_iter is recorded (n_iter, converged) and said below, in
        # terms of this stage, instead of scikit-learn's generic warning
        warnings.filterwarnings("ignore", category=ConvergenceWarning)
        W = nmf.fit_transform(X)
    H = nmf.components_
    norms = np.linalg.norm(H, axis=1)
    norms[norms == 0] = 1
    H = H / norms[:, None]
    W = W * norms[None, :]
    order = np.argsort(-W.sum(0), kind="stable")
    err = float(np.linalg.norm(X - W @ (H * 1.0)) / max(np.linalg.norm(X), 1e-12))
    converged = int(nmf.n_iter_) < max_iter
    if not converged:
        logger.info(
            "NMF concepts: stopped at max_iter=%d before the tolerance 1e-5; relative reconstruction error %.3f",
            max_iter,
            err,
        )
    return ConceptModel(
        components=H[order].astype(np.float32),
        reconstruction_error=err,
        n_positions=len(X),
        n_iter=int(nmf.n_iter_),
        converged=converged,
    )


def concept_maps(activations: np.ndarray, model: ConceptModel, *, n_iter: int = 100) -> np.ndarray:
    """Concept maps of tiles: non-negative projection of each position on the prototypes.

    Parameters
    ----------
    activations : (m, C, h, w) >= 0 (any float dtype; not modified)

    Returns
    -------
    (m, K, h, w) float32; a tile's concept weights are ``maps.mean((2, 3))``.
    """
    m, c, h, w = activations.shape
    X = np.moveaxis(np.asarray(activations, np.float32), 1, -1).reshape(-1, c)
    H = model.components.astype(np.float32)
    # multiplicative updates for min ||X - W H|| with W >= 0, H fixed (batched NNLS)
    HHt = H @ H.T
    XHt = X @ H.T
    W = np.maximum(XHt / np.maximum(np.diag(HHt), 1e-12), 1e-6).astype(np.float32)
    for _ in range(n_iter):
        W *= XHt / np.maximum(W @ HHt, 1e-12)
    return np.moveaxis(W.reshape(m, h, w, -1), -1, 1).astype(np.float32)


def concept_prediction_association(weights: np.ndarray, predicted: np.ndarray, *, seed: int = 0) -> dict:
    """How each concept relates to the model's prediction.

    Parameters
    ----------
    weights : (n, K) concept weights per tile
    predicted : (n,) int, predicted class (binary: positive = class 1; multi-class: one vs rest
        of the most frequent non-zero class)

    Returns
    -------
    dict with ``auc`` (K,) (AUC of each concept's weight alone for the positive prediction),
    ``coef`` (K,) (standardised logistic-regression coefficients of all concepts together) and
    ``auc_all`` (cross-validated AUC of that regression). NaN where only one class is present.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import cross_val_predict

    W = np.asarray(weights, np.float64)
    pred = np.asarray(predicted)
    k = W.shape[1]
    classes = [c for c in np.unique(pred) if c != 0]
    if not classes or len(np.unique(pred)) < 2:
        return {"auc": np.full(k, np.nan), "coef": np.full(k, np.nan), "auc_all": float("nan")}
    pos = max(classes, key=lambda c: (pred == c).sum()) if len(classes) > 1 else classes[0]
    y = (pred == pos).astype(int)
    auc = np.array([roc_auc_score(y, W[:, j]) for j in range(k)])
    Z = (W - W.mean(0)) / np.where(W.std(0) > 0, W.std(0), 1)
    lr = LogisticRegression(max_iter=1000, random_state=seed)
    folds = int(min(5, np.bincount(y).min()))
    auc_all = float("nan")
    if folds >= 2:
        p = cross_val_predict(lr, Z, y, cv=folds, method="predict_proba")[:, 1]
        auc_all = float(roc_auc_score(y, p))
    coef = lr.fit(Z, y).coef_[0]
    return {"auc": auc, "coef": coef, "auc_all": auc_all}


def concept_cam_correlation(maps: np.ndarray, cams: np.ndarray) -> np.ndarray:
    """Mean over tiles of the Pearson correlation between each concept map and the CAM.

    Parameters
    ----------
    maps : (n, K, h, w)
    cams : (n, h, w) at the same resolution

    Returns
    -------
    (K,) float; tiles where either map is constant are skipped.
    """
    n, k, h, w = maps.shape
    a = maps.reshape(n, k, -1).astype(np.float64)
    b = cams.reshape(n, 1, -1).astype(np.float64)
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    den = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    r = np.where(den > 0, (a * b).sum(-1) / np.where(den > 0, den, 1), np.nan)
    with np.errstate(all="ignore"):
        return np.nanmean(r, axis=0) if np.isfinite(r).any() else np.full(k, np.nan)
