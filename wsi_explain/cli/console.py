"""What every command shares: logging setup, the one error mapper, config validation, opening a
run, and the one progress bar. Rich and pydantic are imported inside the functions, so that
``wsi-explain --help`` stays instant."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import typer

__all__ = ["setup_logging", "fail", "exits_on_error", "make_config", "open_run", "progress_bar", "csv"]


def setup_logging(verbose: bool) -> None:
    """Handlers on our own loggers only (never the root logger), for the CLI process."""
    from rich.logging import RichHandler

    for name, quiet in (
        ("wsi_explain", logging.INFO),
        ("tiling", logging.WARNING),
        ("clustering", logging.WARNING),
        ("viz", logging.WARNING),
    ):
        log = logging.getLogger(name)
        if not log.handlers:
            log.addHandler(RichHandler(show_path=False, markup=False))
        log.setLevel(logging.DEBUG if verbose else quiet)


def fail(msg: str) -> None:
    """Print ``error: msg`` on stderr and exit with status 2."""
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {msg}", markup=True, highlight=False)
    raise typer.Exit(2)


@contextlib.contextmanager
def exits_on_error(*kinds: type[BaseException]):
    """The one error mapper: an error of ``kinds`` (default: every :class:`WsiExplainError`,
    model errors included) inside the block becomes ``error: <message>`` and exit status 2."""
    from wsi_explain.core.errors import WsiExplainError

    catch = tuple(kinds) or (WsiExplainError,)
    try:
        yield
    except catch as exc:
        fail(str(exc))


def make_config(cls, what: str, **kw):
    """A validated config, or exit 2 with every problem listed."""
    from pydantic import ValidationError

    try:
        return cls(**kw)
    except ValidationError as exc:
        errs = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
        fail(f"invalid {what} parameters: {errs}")


def open_run(path: Path):
    """The run folder opened for writing, or exit 2 with the reason (locked, bad manifest)."""
    from wsi_explain.core.errors import ManifestError, RunLockedError
    from wsi_explain.core.run import RunFolder

    with exits_on_error(RunLockedError, ManifestError):
        return RunFolder(path)


def _rate_column():
    from rich.progress import ProgressColumn
    from rich.text import Text

    class TilesPerSecond(ProgressColumn):
        def render(self, task):
            return Text(f"{task.speed:.1f} tiles/s" if task.speed else "- tiles/s")

    return TilesPerSecond()


def progress_bar(*, console=None, rate: bool = False):
    """The one rich progress bar of the CLI: description, bar, done/total, (tiles/s), elapsed."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    cols += [_rate_column()] if rate else []
    return Progress(*cols, TimeElapsedColumn(), console=console)


def csv(value: str | None) -> tuple[str, ...]:
    """``"a, b,"`` -> ``("a", "b")``; None or empty -> ()."""
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else ()
