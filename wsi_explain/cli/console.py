"""What every command shares: logging setup, the one error mapper, config validation, opening a
run, and the one progress bar. Rich and pydantic are imported inside the functions, so that
``wsi-explain --help`` stays instant."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import typer

__all__ = [
    "setup_logging",
    "fail",
    "exits_on_error",
    "make_config",
    "open_run",
    "progress_bar",
    "step_status",
    "StepProgress",
    "csv",
]


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


def require_run(path: Path, hint: str = "") -> None:
    """Exit 2 unless ``path`` is a run folder (has a manifest); nothing is created otherwise."""
    if not (Path(path) / "manifest.json").exists():
        fail(f"{path}: not a run folder (no manifest.json)" + (f"; {hint}" if hint else ""))


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


def progress_bar(*, console=None, rate: bool = False) -> StepProgress:
    """The one progress display of the CLI (see :class:`StepProgress`)."""
    return StepProgress(console=console, rate=rate)


class StepProgress:
    """Progress of long steps: on a terminal, a rich bar (description, bar, done/total, tiles/s when
    ``rate``, elapsed, ETA); in a non-interactive log (a pipe, a file, CI), one line when a task
    starts and one per 10 % with the rate and the ETA, so ``make demo > log`` shows the work going on.
    The API is rich's: ``add_task``, ``update(task, completed=, total=, advance=, description=)``,
    ``advance``."""

    def __init__(self, *, console=None, rate: bool = False) -> None:
        from rich.console import Console

        self.console = console or Console()
        self.rate = rate
        self._bar = None
        self._tasks: dict[int, dict] = {}
        if self.console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
            cols += [_rate_column()] if rate else []
            cols += [TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
            self._bar = Progress(*cols, console=self.console)

    def __enter__(self) -> StepProgress:
        if self._bar is not None:
            self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def add_task(self, description: str, total: float | None = None) -> int:
        if self._bar is not None:
            return self._bar.add_task(description, total=total)
        tid = len(self._tasks)
        self._tasks[tid] = {"desc": description, "total": total, "done": 0.0, "t0": time.monotonic(), "decile": 0}
        self._say(tid)
        return tid

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, advance=advance)

    def update(self, task: int, *, completed=None, total=None, advance=None, description=None) -> None:
        if self._bar is not None:
            kw = {k: v for k, v in (("completed", completed), ("total", total), ("advance", advance)) if v is not None}
            self._bar.update(task, description=description, **kw)
            return
        t = self._tasks[task]
        t["desc"] = description or t["desc"]
        t["total"] = total if total is not None else t["total"]
        t["done"] = completed if completed is not None else t["done"] + (advance or 0)
        if t["total"]:
            decile = int(10 * min(t["done"], t["total"]) / t["total"])
            if decile > t["decile"]:
                self._say(task, decile)

    def _say(self, task: int, decile: int | None = None) -> None:
        t = self._tasks[task]
        if decile is None:
            self.console.print(f"{t['desc']}: started" + (f" ({t['total']:g} to do)" if (t["total"] or 0) > 1 else ""))
            return
        t["decile"] = decile
        secs = time.monotonic() - t["t0"]
        speed = t["done"] / secs if secs > 0 else 0.0
        eta = (t["total"] - t["done"]) / speed if speed > 0 else float("nan")
        line = f"{t['desc']}: {t['done']:g}/{t['total']:g} ({10 * decile} %), {secs:.0f} s"
        line += f", {speed:.1f} tiles/s" if self.rate else ""
        line += f", ETA {eta:.0f} s" if decile < 10 and eta == eta else ""
        self.console.print(line, highlight=False)


@contextlib.contextmanager
def step_status(console, message: str):
    """A step without a count: a rich spinner on a terminal; in a log, a line when it starts and
    one with its duration when it ends."""
    if console.is_terminal:
        with console.status(message) as st:
            yield st
        return
    t0 = time.monotonic()
    console.print(f"{message}: started", highlight=False)
    yield None
    console.print(f"{message}: done in {time.monotonic() - t0:.1f} s", highlight=False)


def csv(value: str | None) -> tuple[str, ...]:
    """``"a, b,"`` -> ``("a", "b")``; None or empty -> ()."""
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else ()
