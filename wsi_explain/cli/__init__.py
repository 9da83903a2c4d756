"""The ``wsi-explain`` command line: thin typer commands over library functions.

Heavy imports live inside the commands so that ``wsi-explain --help`` is instant.
"""

from __future__ import annotations

from wsi_explain.cli import mil_command, run_commands, selftest_command, stage_commands, verdicts_command  # noqa: F401  (they register the commands)
from wsi_explain.cli.app import app

__all__ = ["app", "main"]


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    main()
