"""wsi-explain: explain what a whole-slide pathology classifier has learned.

The application package: configuration, the run folder and manifest, the stages and the CLI.
"""

from .config import TileConfig
from .errors import ManifestError, RunLockedError, SlideListError, WsiExplainError
from .pipeline import PipelineConfig, run_pipeline
from .run import RunFolder
from .slides import SlideSource, discover_slides, safe_slide_id, slide_fingerprint
from .tile_stage import TileResult, read_tile_table, run_tile_stage, tile_slide

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
