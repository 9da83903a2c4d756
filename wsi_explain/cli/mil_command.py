"""``wsi-explain mil RUN``: a slide-level MIL head over the stored embeddings, the tiles its decisions
rest on, and counterfactual bags."""

from __future__ import annotations

from pathlib import Path

import typer

from wsi_explain.cli.app import app
from wsi_explain.cli.console import exits_on_error, make_config, open_run, require_run, setup_logging


@app.command()
def mil(
    run: Path = typer.Argument(..., help="Run folder (extracted and clustered)."),
    head: str = typer.Option(
        "abmil", help="abmil, gated_abmil, clam_sb, package.module:factory or a TorchScript file."
    ),
    weights: str = typer.Option(None, help="State dict of the head."),
    n_classes: int = typer.Option(2),
    target: int = typer.Option(1, help="Class whose logit is explained."),
    ig_steps: int = typer.Option(32),
    baseline: str = typer.Option("zero", help="Integrated Gradients baseline: zero or mean."),
    loo_sample: int = typer.Option(64, help="Tiles per slide left out one at a time (seeded)."),
    trust_checkpoint: bool = typer.Option(False, "--trust-checkpoint"),
    seed: int = typer.Option(0),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Score every slide with a MIL head on its stored tile embeddings; per tile: attention, gradient x
    input, Integrated Gradients and leave-one-out (in each slide's features.zarr, group mil/); per
    slide: faithfulness of each against leave-one-out; per cluster: mean attention and relevance;
    counterfactual bags (clusters removed, the most relevant tiles removed, clusters added to
    negative bags)."""
    setup_logging(verbose)
    from rich.console import Console

    from wsi_explain.core.stage_configs import MilConfig
    from wsi_explain.stages.mil import run_mil_stage

    cfg = make_config(
        MilConfig,
        "mil",
        head=head,
        weights=weights,
        n_classes=n_classes,
        target=target,
        ig_steps=ig_steps,
        baseline=baseline,
        loo_sample=loo_sample,
        trust_checkpoint=trust_checkpoint,
        seed=seed,
    )
    require_run(run)
    console = Console()
    with open_run(run) as rf, exits_on_error():
        run_mil_stage(rf, cfg)
    print_mil(run, console)


def print_mil(run: Path, console) -> None:
    """The MIL summary of a run (``cohort/mil.json``): faithfulness per relevance kind, AUC, QWK."""
    import json

    p = Path(run) / "cohort" / "mil.json"
    if not p.exists():
        return
    s = json.loads(p.read_text())
    f = s["faithfulness"]
    console.print(
        f"MIL head {s['head']} on {s['n_slides']} slides; agreement with leave-one-out (mean Spearman per slide): "
        + ", ".join(f"{k} {v:.2f}" for k, v in f.items()),
        highlight=False,
    )
    if "auc_before" in s:
        console.print(f"cohort AUC of the head: {s['auc_before']:.3f}", highlight=False)
    if "qwk_before" in s:
        console.print(f"quadratic-weighted kappa with the ISUP grades: {s['qwk_before']:.3f}", highlight=False)
