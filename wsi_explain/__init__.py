"""wsi-explain: explain what a whole-slide pathology classifier has learned.

The application package: configuration, the run folder and manifest, the stages and the CLI.
"""

from wsi_explain.core.config import TileConfig
from wsi_explain.core.errors import ManifestError, RunLockedError, SlideListError, WsiExplainError
from wsi_explain.core.run import RunFolder
from wsi_explain.io.slides import SlideSource, discover_slides, safe_slide_id, slide_fingerprint
from wsi_explain.io.tile_table import read_tile_table
from wsi_explain.stages.pipeline import PipelineConfig, run_pipeline
from wsi_explain.stages.tile import TileResult, run_tile_stage, tile_slide

__version__ = "0.1.0"

__all__ = [
    "ManifestError",
    "PipelineConfig",
    "RunFolder",
    "RunLockedError",
    "SlideListError",
    "SlideSource",
    "TileConfig",
    "TileResult",
    "WsiExplainError",
    "discover_slides",
    "read_tile_table",
    "run_pipeline",
    "run_tile_stage",
    "safe_slide_id",
    "slide_fingerprint",
    "tile_slide",
]
