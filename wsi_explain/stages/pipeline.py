"""The whole audit in one call: tile, extract, cluster, score and report, skipping what is done.

Per-slide stages (tiling, extraction) run through an executor (here, or a Dask cluster); the
cohort stages run here. Each stage records itself in the manifest, so a killed run resumes where
it stopped and a finished one is a no-op.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import Field

from wsi_explain.core.config import ClusterConfig, ExtractConfig, ScoreConfig, TileConfig, _Frozen
from wsi_explain.core.errors import DiskFullError, WsiExplainError, is_disk_full
from wsi_explain.core.run import STAGES, RunFolder
from wsi_explain.core.stage_configs import MilConfig, SelftestConfig

__all__ = ["PipelineConfig", "PipelineResult", "run_pipeline", "load_pipeline_config", "read_pipeline_yaml", "STAGES"]

logger = logging.getLogger(__name__)


class PipelineConfig(_Frozen):
    """Everything ``wsi-explain run`` needs (the YAML file's layout).

    Attributes
    ----------
    slides : list of str
        Slide files, folders or cohort CSVs (path, label, site, annotations... columns).
    out : str
        Run folder.
    tile, extract, cluster, score : the stages' configs.
    selftest : SelftestConfig or None
        When given, the self-test runs after the score stage (before the report, which shows it).
    mil : MilConfig or None
        When given, a slide-level MIL head is explained after the score stage (and the self-test),
        before the report, which shows what the slide decisions rest on.
    stages : stages to run (default all).
    workers : int
        Dask LocalCluster worker processes for tiling and extraction (1 = run here).
    scheduler : str or None
        Address of an existing Dask scheduler (``tcp://host:port``).
    mpp : float or None
        Level-0 µm/px for files that lack it.
    """

    slides: tuple[str, ...]
    out: str
    tile: TileConfig = TileConfig()
    extract: ExtractConfig = ExtractConfig()
    cluster: ClusterConfig = ClusterConfig()
    score: ScoreConfig = ScoreConfig()
    selftest: SelftestConfig | None = None
    mil: MilConfig | None = None
    stages: tuple[str, ...] = STAGES
    workers: int = Field(1, ge=1, le=256)
    scheduler: str | None = None
    mpp: float | None = None


def load_pipeline_config(path: str | Path, **overrides) -> PipelineConfig:
    """Read and validate a YAML config (relative paths are relative to the file)."""
    doc = read_pipeline_yaml(path)
    doc.update({k: v for k, v in overrides.items() if v is not None})
    return PipelineConfig(**doc)


def read_pipeline_yaml(path: str | Path) -> dict:
    """The YAML config as a dict, slide and output paths resolved against the file's folder
    (not validated yet: the CLI merges its options first)."""
    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise WsiExplainError(f"{p}: cannot read the run config ({exc})") from exc
    if not isinstance(doc, dict):
        raise WsiExplainError(f"{p}: the run config must be a mapping")
    base = p.parent.resolve()
    if "slides" in doc:
        sl = doc["slides"] if isinstance(doc["slides"], list) else [doc["slides"]]
        doc["slides"] = [str((base / s).resolve()) if not Path(s).is_absolute() else s for s in sl]
    if "out" in doc and not Path(doc["out"]).is_absolute():
        doc["out"] = str((base / doc["out"]).resolve())
    mil = doc.get("mil")
    if isinstance(mil, dict) and mil.get("weights") and not Path(mil["weights"]).is_absolute():
        doc["mil"] = {**mil, "weights": str((base / mil["weights"]).resolve())}
    return doc


@dataclass
class PipelineResult:
    run: Path
    stages: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    failed_slides: dict = field(default_factory=dict)
    report: Path | None = None


# One runner per stage, in pipeline order: (run, cfg, executor, say) -> (summary, report index or None).
# The summary is the stage's status, or for per-slide stages the count of slides per status.


def _run_tile(run: RunFolder, cfg: PipelineConfig, executor, say) -> tuple:
    from wsi_explain.io.slides import discover_slides
    from wsi_explain.stages.tile import run_tile_stage

    sources = discover_slides(list(cfg.slides), mpp=cfg.mpp)
    res = run_tile_stage(
        run, sources, cfg.tile, executor=executor, on_slide=lambda r: say("tile", f"{r.slide_id}: {r.status}")
    )
    return _counts(res), None


def _run_extract(run: RunFolder, cfg: PipelineConfig, executor, say) -> tuple:
    from wsi_explain.stages.extract import run_extract_stage

    res = run_extract_stage(
        run, cfg.extract, executor=executor, on_slide=lambda r: say("extract", f"{r.slide_id}: {r.status}")
    )
    return _counts(res), None


def _run_cluster(run: RunFolder, cfg: PipelineConfig, executor, say) -> tuple:
    from wsi_explain.stages.cluster import run_cluster_stage

    return run_cluster_stage(run, cfg.cluster, on_step=lambda s: say("cluster", s)).status, None


def _run_score(run: RunFolder, cfg: PipelineConfig, executor, say) -> tuple:
    from wsi_explain.stages.score import run_score_stage

    return run_score_stage(run, cfg.score, on_progress=lambda w, d, t: say("score", f"{w} {d}/{t}")).status, None


def _run_report(run: RunFolder, cfg: PipelineConfig, executor, say) -> tuple:
    from wsi_explain.stages.report import run_report_stage

    rep = run_report_stage(run, on_progress=lambda w, d, t: say("report", f"{w} {d}/{t}"))
    return rep.status, rep.index


RUNNERS: dict[str, Callable] = {
    "tile": _run_tile,
    "extract": _run_extract,
    "cluster": _run_cluster,
    "score": _run_score,
    "report": _run_report,
}
assert tuple(RUNNERS) == STAGES, "a runner per stage, in pipeline order"


def run_pipeline(
    cfg: PipelineConfig, *, executor=None, on_event: Callable[[str, str], None] | None = None
) -> PipelineResult:
    """Run the stages of ``cfg`` in order (see the module docstring).

    Parameters
    ----------
    executor : optional executor for the per-slide stages (default from ``workers``/``scheduler``;
        one given here is not closed).
    on_event : callable(stage, message), optional (progress in the CLI).
    """
    from wsi_explain.core.executor import make_executor

    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise WsiExplainError(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    say = on_event or (lambda stage, msg: None)
    out = PipelineResult(Path(cfg.out))
    own = executor is None
    executor = executor or make_executor(workers=cfg.workers, scheduler=cfg.scheduler)
    try:
        with RunFolder(cfg.out) as run:
            setup = {"workers": cfg.workers, "scheduler": cfg.scheduler, "stages": list(cfg.stages)}
            run.set_config("pipeline", {**setup, "executor": executor.name})
            for stage, runner in RUNNERS.items():
                if stage == "report" and cfg.selftest is not None:  # after score, so that the report shows it
                    _timed(out, "selftest", say, _run_selftest, run, cfg, executor, say)
                if stage == "report" and cfg.mil is not None:
                    _timed(out, "mil", say, _run_mil, run, cfg, executor, say)
                if stage in cfg.stages:
                    _timed(out, stage, say, runner, run, cfg, executor, say)
            out.failed_slides = _failed_slides(run)
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFullError(
                f"disk full while writing to {cfg.out} ({exc}); what finished is kept: free space and rerun to resume"
            ) from exc
        raise
    finally:
        if own:
            executor.close()
    return out


def _run_mil(run: RunFolder, cfg: PipelineConfig, executor, say) -> tuple:
    from wsi_explain.stages.mil import run_mil_stage

    s = run_mil_stage(run, cfg.mil)
    say("mil", f"head {s['head']} on {s['n_slides']} slides")
    return "done", None


def _run_selftest(run: RunFolder, cfg: PipelineConfig, executor, say) -> tuple:
    import contextlib

    from wsi_explain.stages.selftest import run_selftest

    @contextlib.contextmanager
    def step(msg: str):
        say("selftest", msg)
        yield

    figures = run_selftest(run, cfg.selftest, step=step)
    return {k: v["recall"] for k, v in figures["planted"]["kinds"].items()}, None


def _timed(out: PipelineResult, stage: str, say, runner, *args) -> None:
    """Run one stage's runner, recording its summary, report index and seconds in ``out``."""
    t0 = time.perf_counter()
    say(stage, "started")
    out.stages[stage], report = runner(*args)
    out.report = report or out.report
    out.seconds[stage] = round(time.perf_counter() - t0, 2)
    say(stage, f"finished in {out.seconds[stage]:.1f} s")


def _failed_slides(run: RunFolder) -> dict[str, str]:
    """slide id -> "stage: error" for slides that failed tiling or extraction (the first stage)."""
    out: dict[str, str] = {}
    for stage in ("tile", "extract"):
        for sid, rec in run.stage(stage)["slides"].items():
            if rec.get("status") == "failed":
                out.setdefault(sid, f"{stage}: {rec.get('error')}")
    return out


def _counts(results) -> dict:
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    return counts
