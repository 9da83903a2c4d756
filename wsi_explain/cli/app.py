"""The typer application every command registers with."""

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Explain what a whole-slide classifier has learned.")
