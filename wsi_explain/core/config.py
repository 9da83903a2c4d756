"""Validated, frozen run configuration (serialised into the manifest)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["TileConfig", "ExtractConfig", "ClusterConfig", "ScoreConfig", "METRIC_GROUPS"]


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
    find_ink : bool
        Detect pen ink (optical-density residual of the slide's own H&E, see ``tiling.detect_ink``).
        Tissue under ink stays tissue; each tile records its ink fraction.
    qc : bool
        Measure every tile (sharpness, H and E optical density, brightness, stained share) as
        columns of the tile table; this reads every tile once.
    qc_threads : int
        Threads reading tiles for the QC (an execution setting, not in the params hash).
    drop_artefacts : bool
        Leave artefact tiles out of the grid: ink fraction at least ``max_ink_frac`` or
        sharpness below ``min_sharpness`` (needs ``qc``). Off by default: an audit keeps them,
        because a shortcut model was trained on them.
    max_ink_frac, min_sharpness : float
        The artefact thresholds (the cluster flags use the same defaults).
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
    find_ink: bool = True
    qc: bool = True
    qc_threads: int = Field(2, ge=1, le=64)
    drop_artefacts: bool = False
    max_ink_frac: float = Field(0.05, ge=0.0, le=1.0)
    min_sharpness: float = Field(0.06, ge=0.0, le=1.0)
    verify: Literal["none", "sample", "all"] = "sample"
    verify_n: int = Field(32, ge=1)
    label_classes: dict[int, str] | None = None

    @model_validator(mode="after")
    def _check(self) -> TileConfig:
        if self.overlap >= self.tile_px:
            raise ValueError(f"overlap ({self.overlap}) must be smaller than tile_px ({self.tile_px})")
        if self.mpp_target is None and self.magnification is None:
            raise ValueError("give mpp_target or magnification")
        if self.drop_artefacts and not self.qc:
            raise ValueError("drop_artefacts needs qc (the sharpness of every tile)")
        return self

    def result_params(self) -> dict:
        """The fields that determine the results (hashed into the manifest)."""
        d = self.model_dump(mode="json")
        d.pop("qc_threads", None)
        return d

    def grid_spec(self):
        """The :class:`tiling.GridSpec` of this config."""
        from tiling import GridSpec

        mpp = None if self.magnification is not None else self.mpp_target
        return GridSpec(
            tile_px=self.tile_px,
            mpp=mpp,
            magnification=self.magnification,
            overlap=self.overlap,
            min_tissue=self.min_tissue,
        )


class ExtractConfig(_Frozen):
    """Parameters of the extraction stage.

    Attributes
    ----------
    arch : str
        torchvision name, ``efficientnet_lite0``, ``export`` (a ``torch.export`` program), ``torchscript``
        or ``package.module:factory``.
    weights : str or None
        Checkpoint (state dict, ``weights_only=True``), ``.pt2`` program or TorchScript file.
    ensemble : tuple of str
        More checkpoints of the same architecture (different seeds); run in the same pass.
    num_classes, class_names, card : model card overrides.
    trust_checkpoint : bool
        Allow full unpickling of checkpoints that need it.
    methods : tuple of str
        Fused CAMs (gradcam, gradcampp, xgradcam, hirescam, layercam, eigencam, eigencam_signed,
        segeigencam).
    target : str
        "pred" (predicted class) or a class index / name explained by the CAMs.
    target_layer, embedding_layer : str or None
        Module names; default: last conv block, input of the final classifier (segmentation
        models: the backbone's last stage for both, its output averaged over space).
    region : "predicted", "tile", "annotation" or None
        Segmentation models only: the target class's logit summed over the pixels predicted as
        that class (default), the whole tile, or the annotated area under the tile (the slide's
        GeoJSON or label mask, rasterised per tile) (:mod:`wsi_explain.explain.segmentation`).
    region_labels : annotation classes whose union is the ``"annotation"`` region (default: all).
    activations : bool
        Store spatial activations for concept discovery (float16, compressed).
    attr_sample : int
        Methods outside the fused pass (captum, ScoreCAM...) run on this many tiles per slide,
        drawn with ``seed`` (0 = every tile).
    attr_px : int
        Their maps are stored at this size (area-averaged).
    attr_max_batch : int
        Most images their model calls see at once (memory bound), however many steps or samples.
    ig_steps, ig_max_steps, ig_tolerance :
        Integrated Gradients (when in ``methods``): Gauss-Legendre steps of the first pass; tiles
        whose relative completeness error ``|sum(attr) - (f(x) - f(b))| / |f(x) - f(b)|`` exceeds
        ``ig_tolerance`` are recomputed with twice the steps, up to ``ig_max_steps`` (at or below
        ``ig_steps``: no refinement) (:mod:`wsi_explain.explain.integrated_gradients`).
    reader : {"auto", "threads", "processes"}
        How tiles are read: background threads in the main process, or DataLoader worker
        processes; "auto" = threads on CPU (worker processes cost throughput on small CPUs),
        processes on CUDA (the CPU is then free to decode).
    decoder : {"auto", "openslide"}
        "auto" decodes a tiled TIFF's (or SVS's) tiles directly, the same pixels in a fraction of
        OpenSlide's time (:class:`tiling.tiffreader.TiffTileReader`); other files use OpenSlide.
    batch_size, workers, chunk_tiles, device, amp :
        Execution settings; they do not change the results, so they are not in the params hash.
    """

    arch: str = "resnet18"
    weights: str | None = None
    ensemble: tuple[str, ...] = ()
    num_classes: int | None = Field(None, ge=1)
    class_names: tuple[str, ...] | None = None
    card: str | None = None
    trust_checkpoint: bool = False
    methods: tuple[str, ...] = ("gradcam", "gradcampp", "xgradcam", "hirescam", "layercam", "eigencam")
    target: str = "pred"
    target_layer: str | None = None
    embedding_layer: str | None = None
    region: Literal["predicted", "tile", "annotation"] | None = None
    region_labels: tuple[str, ...] = ()
    activations: bool = False
    attr_sample: int = Field(64, ge=0)
    attr_px: int = Field(56, ge=4, le=1024)
    attr_max_batch: int = Field(32, ge=1, le=4096)
    ig_steps: int = Field(50, ge=2, le=4096)
    ig_max_steps: int = Field(200, ge=2, le=8192)
    ig_tolerance: float = Field(0.05, gt=0, le=10)
    seed: int = 0
    batch_size: int = Field(32, ge=1, le=4096)
    workers: int = Field(2, ge=0, le=64)
    reader: Literal["auto", "threads", "processes"] = "auto"
    decoder: Literal["auto", "openslide"] = "auto"
    chunk_tiles: int = Field(256, ge=1, le=65536)
    device: str = "auto"
    amp: bool = True

    @model_validator(mode="after")
    def _check_region(self) -> ExtractConfig:
        if self.region_labels and self.region != "annotation":
            raise ValueError('region_labels name annotation classes: they need region="annotation"')
        return self

    def result_params(self) -> dict:
        """The fields that determine the results (hashed into the manifest)."""
        d = self.model_dump(mode="json")
        for k in ("batch_size", "workers", "chunk_tiles", "device", "attr_max_batch", "reader", "decoder"):
            d.pop(k, None)
        if not d["region_labels"]:  # absent as before it existed: older runs keep their hash
            d.pop("region_labels")
        if "integratedgradients" not in self.methods:  # they change nothing else
            for k in ("ig_steps", "ig_max_steps", "ig_tolerance"):
                d.pop(k)
        return d


class ClusterConfig(_Frozen):
    """Parameters of the cohort clustering stage.

    Attributes
    ----------
    method : {"hdbscan", "kmeans"}
    k : int, clusters for k-means.
    min_cluster_size : int or None, HDBSCAN's; None = max(5, min(100, n // 50)).
    min_samples : int or None
    pca : int, PCA dimensions before the k-NN (0 = none).
    l2 : bool, L2-normalise embeddings (after PCA).
    n_neighbors, min_dist : UMAP's.
    cluster_dims : int
        UMAP dimensions HDBSCAN clusters in (the 2-D one is for display).
    knn_method : {"auto", "exact", "ivf", "hnsw"}
    exact_max : int
        Cohorts up to this size get an exact k-NN.
    fit_max : int
        HDBSCAN is fitted on at most this many tiles, the rest assigned.
    umap_fit_max : int
        UMAP is fitted on at most this many tiles; the rest are placed from their FAISS neighbours.
    concepts : int
        NMF concept prototypes (0 = none; needs ``extract --activations``).
    concept_positions : int
        Spatial positions sampled over the cohort to fit NMF.
    cam_method : str or None
        CAM used for attribution summaries (default: the first extracted).
    positive_class : int
        Model class that counts as "positive" (predicted positive rate, flags).
    positive_labels : tuple of str
        Annotation classes that are positive (tile labels); else a numeric slide ``label`` > 0.
    seed : int
    """

    method: Literal["hdbscan", "kmeans"] = "hdbscan"
    k: int = Field(8, ge=1)
    min_cluster_size: int | None = Field(None, ge=2)
    min_samples: int | None = Field(None, ge=1)
    pca: int = Field(50, ge=0)
    l2: bool = True
    n_neighbors: int = Field(15, ge=2, le=200)
    min_dist: float = Field(0.0, ge=0.0, le=1.0)
    cluster_dims: int = Field(5, ge=2, le=50)
    knn_method: Literal["auto", "exact", "ivf", "hnsw"] = "auto"
    exact_max: int = Field(50_000, ge=1)
    fit_max: int = Field(200_000, ge=100)
    umap_fit_max: int = Field(200_000, ge=100)
    concepts: int = Field(0, ge=0, le=64)
    concept_positions: int = Field(20_000, ge=100)
    cam_method: str | None = None
    positive_class: int = Field(1, ge=0)
    positive_labels: tuple[str, ...] = ()
    seed: int = 0


#: the metric families of the score stage
METRIC_GROUPS = (
    "faithfulness",
    "robustness",
    "localisation",
    "complexity",
    "ensemble",
    "sanity",
    "removal",
    "confounders",
)


class ScoreConfig(_Frozen):
    """Parameters of the metrics stage (``wsi-explain score``).

    Attributes
    ----------
    methods : tuple of str
        Attribution methods to score (default: every method the run extracted). Any fused CAM or
        registered attributor may be named: maps of the sampled tiles are recomputed.
    groups : tuple of str
        Metric families to run (see :data:`METRIC_GROUPS`).
    per_cluster : int
        Tiles sampled per cluster for the expensive metrics (balanced over the cluster's slides),
        re-read from the slides; cheap metrics (complexity, ensemble, removal) use every tile.
    include_noise : bool
        Also score HDBSCAN's noise tiles (cluster -1).
    steps : int
        Deletion/insertion steps.
    baselines : tuple of str
        Deletion/insertion baselines ("blur", "constant").
    mask_threshold : float
        Threshold of the min-max normalised map for the binary-mask Drop/Increase in Confidence
        and the IoU/coverage.
    road_percentiles : tuple of int
    road_tiles : int
        ROAD runs on the first ``road_tiles`` tiles of each cluster's sample (0 = all, the default:
        the batched imputation costs about as much as the 1 + 2 x percentiles forwards).
    references : tuple of str
        Reference maps scored with the faithfulness metrics on the same tiles, so that every
        method's number has a floor: ``"random"`` (seeded Gaussian noise at the CAMs' 7 x 7
        resolution, upsampled like them) and ``"uniform"`` (a flat map with its ties broken in a
        seeded random pixel order). ``cluster_metrics`` gets each method's paired gain over them.
    infidelity_samples, infidelity_noise : perturbations per tile and their std (normalised units).
    sensitivity_samples, sensitivity_radius : the same for ``sensitivity_max``.
    sanity_tiles : int
        Tiles per cluster (from the sample) for the cascading randomisation test.
    sanity_threshold : float
        A method passes when the mean Spearman correlation with the original maps after full
        randomisation is below this.
    grades : dict or None
        Annotation class -> graded-hit score; default: the run's positive labels in order score
        3, 2, 1, other annotated classes 0, unannotated pixels -1.
    models : tuple of str
        Extra checkpoints of the same architecture for the ensemble spread on the sample (the
        run's own ensemble arrays, when extracted with ``--ensemble``, are used for every tile).
    topk : int
        Top-k aggregation of slide scores in the cluster-removal experiment.
    n_boot : int
        Bootstrap resamples of the confidence intervals (95 %).
    seed : int
    batch_size, device : execution settings (not in the params hash).
    """

    methods: tuple[str, ...] = ()
    groups: tuple[str, ...] = METRIC_GROUPS
    per_cluster: int = Field(64, ge=1, le=100_000)
    include_noise: bool = True
    steps: int = Field(10, ge=2, le=1024)
    baselines: tuple[Literal["blur", "constant"], ...] = ("blur", "constant")
    mask_threshold: float = Field(0.5, gt=0.0, lt=1.0)
    road_percentiles: tuple[int, ...] = (20, 40, 60, 80)
    road_tiles: int = Field(0, ge=0)
    references: tuple[Literal["random", "uniform"], ...] = ("random", "uniform")
    nuisance: tuple[str, ...] = ()
    infidelity_samples: int = Field(10, ge=1, le=1000)
    infidelity_noise: float = Field(0.1, gt=0)
    sensitivity_samples: int = Field(8, ge=1, le=1000)
    sensitivity_radius: float = Field(0.02, gt=0)
    sanity_tiles: int = Field(8, ge=0)
    sanity_threshold: float = Field(0.5, gt=-1.0, le=1.0)
    grades: dict[str, float] | None = None
    models: tuple[str, ...] = ()
    topk: int = Field(8, ge=1)
    n_boot: int = Field(1000, ge=10)
    seed: int = 0
    batch_size: int = Field(32, ge=1, le=4096)
    device: str = "auto"

    @model_validator(mode="after")
    def _check(self) -> ScoreConfig:
        bad = [g for g in self.groups if g not in METRIC_GROUPS]
        if bad:
            raise ValueError(f"unknown metric group(s) {bad}; choose from {list(METRIC_GROUPS)}")
        if any(not 0 < p < 100 for p in self.road_percentiles):
            raise ValueError("road_percentiles must lie strictly between 0 and 100")
        return self

    def result_params(self) -> dict:
        d = self.model_dump(mode="json")
        for k in ("batch_size", "device"):
            d.pop(k, None)
        return d


def __getattr__(name: str):
    """``SelftestConfig`` and ``MilConfig`` live in :mod:`wsi_explain.core.stage_configs` (kept
    importable from here)."""
    if name in ("SelftestConfig", "MilConfig"):
        from wsi_explain.core import stage_configs

        return getattr(stage_configs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
