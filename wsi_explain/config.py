"""Validated, frozen run configuration (serialised into the manifest)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["TileConfig"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TileConfig(_Frozen):
    """Parameters of the tiling stage.

    Attributes
    ----------
    tile_px : int
        Output tile edge in pixels.
    mpp_target : float or None
        Target µm per pixel of the tiles (default 0.5, i.e. about 20x).
    magnification : float or None
        Alternative to ``mpp_target`` (``mpp = 10 / magnification``).
    overlap : int
        Overlap of neighbouring tiles in output pixels.
    min_tissue : float
        Minimum tissue fraction of a kept tile.
    tissue_mpp : float
        Resolution of the tissue mask, µm per pixel (8-32 is sensible).
    min_object_um2 : float
        Tissue pieces smaller than this (µm²) are dropped.
    remove_ink : bool
        Exclude pen ink from the tissue mask.
    verify : {"none", "sample", "all"}
        Read tiles after gridding to catch slides that fail to decode part way: none, up to
        ``verify_n`` tiles spread over the slide, or every tile.
    label_classes : dict or None
        Class index -> name of label masks (default ``class_<i>``); presets via the CLI.
    """

    tile_px: int = Field(224, ge=16, le=4096)
    mpp_target: float | None = Field(0.5, ge=0.05, le=100)
    magnification: float | None = Field(None, ge=0.5, le=200)
    overlap: int = Field(0, ge=0)
    min_tissue: float = Field(0.5, ge=0.0, le=1.0)
    tissue_mpp: float = Field(16.0, ge=1.0, le=256.0)
    min_object_um2: float = Field(20_000.0, ge=0.0)
    remove_ink: bool = True
    verify: Literal["none", "sample", "all"] = "sample"
    verify_n: int = Field(32, ge=1)
    label_classes: dict[int, str] | None = None

    @model_validator(mode="after")
    def _check(self) -> TileConfig:
        if self.overlap >= self.tile_px:
            raise ValueError(f"overlap ({self.overlap}) must be smaller than tile_px ({self.tile_px})")
        if self.mpp_target is None and self.magnification is None:
            raise ValueError("give mpp_target or magnification")
        return self

    def grid_spec(self):
        """The :class:`tiling.GridSpec` of this config."""
        from tiling import GridSpec

        mpp = None if self.magnification is not None else self.mpp_target
        return GridSpec(
            tile_px=self.tile_px, mpp=mpp, magnification=self.magnification, overlap=self.overlap, min_tissue=self.min_tissue
        )
