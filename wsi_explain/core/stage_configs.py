"""Validated, frozen configuration of the audit's optional stages: the self-test
(``wsi-explain selftest``) and the slide-level MIL head (``wsi-explain mil``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from wsi_explain.core.config import _Frozen

__all__ = ["SelftestConfig", "MilConfig"]


class SelftestConfig(_Frozen):
    """Parameters of the self-test (``wsi-explain selftest``, the ``selftest:`` section of ``run``).

    Attributes
    ----------
    n_slides, tiles_per_slide : int
        Size of the planted cohort built from the run's clean tiles (slides cycle through the
        plant kinds; labels alternate, so every kind has positive and negative slides).
    kinds : tuple of {"ink", "blur", "stain"}
        Shortcuts planted (:mod:`tiling.plants`).
    control : bool
        Also audit the same cohort with nothing planted (its flags are false flags).
    n_boot : int
        Bootstrap resamples of the confounder scan (over slides).
    seed : int
    """

    n_slides: int = Field(18, ge=2, le=1000)
    tiles_per_slide: int = Field(25, ge=4, le=400)
    kinds: tuple[Literal["ink", "blur", "stain"], ...] = ("ink", "blur", "stain")
    control: bool = True
    n_boot: int = Field(200, ge=0, le=100_000)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> SelftestConfig:
        if not self.kinds:
            raise ValueError("give at least one plant kind")
        if self.n_slides < 2 * len(self.kinds):
            raise ValueError(f"n_slides ({self.n_slides}) must be at least two per plant kind ({2 * len(self.kinds)})")
        return self


class MilConfig(_Frozen):
    """Parameters of the MIL stage (``wsi-explain mil``): a slide-level head over the stored tile
    embeddings and the relevance of each tile for its decision.

    Attributes
    ----------
    head : str
        ``abmil``, ``gated_abmil``, ``clam_sb``, an entry point ``package.module:factory`` or a
        TorchScript file (:func:`wsi_explain.explain.mil.load_mil_head`).
    weights : str, optional
        State dict of the head (loaded with ``weights_only=True`` unless ``trust_checkpoint``).
    n_classes, target : int
        Classes of the head and the class whose logit is explained.
    ig_steps : int
        Integrated Gradients intervals (trapezoid rule); ``baseline`` "zero" or "mean".
    loo_sample : int
        Tiles per slide left out one at a time (seeded sample; the ground truth of faithfulness).
    topk_share : float
        Share of the most relevant tiles (by IG) removed in the counterfactual bags.
    add_tiles : int
        Tiles of a cluster added to each negative bag in the counterfactual bags.
    """

    head: str = "abmil"
    weights: str | None = None
    trust_checkpoint: bool = False
    n_classes: int = Field(2, ge=1, le=1000)
    target: int = Field(1, ge=0)
    ig_steps: int = Field(32, ge=2, le=4096)
    baseline: Literal["zero", "mean"] = "zero"
    loo_sample: int = Field(64, ge=1, le=100_000)
    topk_share: float = Field(0.1, gt=0, lt=1)
    add_tiles: int = Field(16, ge=1, le=10_000)
    seed: int = 0
