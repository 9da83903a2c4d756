"""``torch.export`` programs (``.pt2``) as models: the format torch 2.x recommends now that
TorchScript is deprecated.

The program is unflattened (:func:`torch.export.unflatten`) back into its original module
hierarchy, so that layers keep their names (``layer4``, ``features``...) and take the forward
hooks the fused CAMs and the embedding read; gradients flow through it as through the eager
model. At load, the unflattened module is checked numerically against the program itself on a
random batch of three tiles (a program exported with a fixed batch size fails there, with the
fix in the message).

Loading is safe by default: ``torch.export.load`` unpickles the archive's tensors and falls back
to full unpickling when that fails; here every ``torch.load`` it makes is held to
``weights_only=True`` unless the user trusts the file (``--trust-checkpoint``).
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from wsi_explain.explain.card import CheckpointTrustError, ModelError

__all__ = ["load_exported"]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _weights_only_loads():
    """Every ``torch.load`` inside the block runs with ``weights_only=True``."""
    real = torch.load

    def safe(*args, **kwargs):
        kwargs["weights_only"] = True
        return real(*args, **kwargs)

    torch.load = safe
    try:
        yield
    finally:
        torch.load = real


def load_exported(path: str | Path, *, tile_px: int, trust: bool = False) -> nn.Module:
    """The ExportedProgram at ``path`` as an eval-mode ``nn.Module`` with its layer names.

    Raises
    ------
    CheckpointTrustError
        The archive needs full unpickling and ``trust`` is False.
    ModelError
        Missing or unreadable file, or the unflattened module does not reproduce the program
        (e.g. a fixed batch size).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: exported program (.pt2) does not exist")
    try:
        with contextlib.nullcontext() if trust else _weights_only_loads():
            ep = torch.export.load(str(path))
    except pickle.UnpicklingError as exc:
        raise CheckpointTrustError(
            f"{path}: this exported program needs full unpickling, which can run arbitrary code; pass "
            f"--trust-checkpoint only if you trust where the file came from ({str(exc).splitlines()[0]})"
        ) from exc
    except (RuntimeError, ValueError, KeyError, OSError, zipfile.BadZipFile) as exc:
        raise ModelError(f"{path}: not a torch.export program ({str(exc).splitlines()[0][:300]})") from exc
    module = torch.export.unflatten(ep)
    # three tiles: a batch size the program was unlikely to be exported with
    x = torch.randn(3, 3, tile_px, tile_px, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            ok = torch.allclose(module(x), ep.module()(x), atol=1e-4, rtol=1e-4)
    except Exception as exc:  # torch raises many kinds on shape guards
        raise ModelError(
            f"{path}: the exported program does not run on a batch of 3 tiles of {tile_px} px ({str(exc)[:300]}); "
            "export it with a dynamic batch dimension, e.g. dynamic_shapes=({0: torch.export.Dim('batch')},)"
        ) from exc
    if not ok:
        raise ModelError(f"{path}: the unflattened program does not reproduce the exported one")
    return module
