"""The one way deepstem reads a checkpoint file: ``torch.load(weights_only=True)``, nothing else.

Unpickling an arbitrary ``.ckpt`` runs whatever code the file names (``os.system`` included), so a
checkpoint downloaded from somewhere must never reach ``pickle``'s full loader. deepstem's own checkpoints
(Lightning checkpoints of ``train.py`` runs and the slim exports in ``pretrained/``) hold only tensors and
plain containers (the LightningModules store plain hyper-parameters, ``training.callbacks`` plain callback
state), so the restricted loader reads them all and no extra globals need allow-listing. A file that needs
anything else is refused with one line naming it; it is never retried with the full unpickler.

Every call site (``reconstruct.py ckpt=``, the evaluation suite, ``train.py init_from=`` / ``ckpt_path=``,
``scripts/export_checkpoint.py``) goes through :func:`load_checkpoint`; Lightning's own loading (resume,
``trainer.test(ckpt_path=...)``) is checked first with :func:`check_checkpoint` and then called with
``weights_only=True`` explicitly, so that no environment variable (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``) can
switch it back to the full unpickler.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["CheckpointError", "check_checkpoint", "load_checkpoint"]

_UNSUPPORTED_GLOBAL = re.compile(r"unsupported(?: global:)? GLOBAL ([\w.]+)", re.IGNORECASE)
_WEIGHTS_UNPICKLER_DETAIL = re.compile(r"WeightsUnpickler error:\s*(\S[^\n]*)")


class CheckpointError(ValueError):
    """A checkpoint that deepstem does not load; the message is one line naming the file."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """The content of the checkpoint at ``path``, read with the restricted (weights-only) unpickler.

    Raises :class:`CheckpointError` (one line, naming ``path``) for a missing file, a file that is not a
    PyTorch checkpoint, one whose top level is not a mapping, and one that needs objects beyond tensors and
    plain containers: such a file could run code when unpickled and is refused, not retried unsafely.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's weights-only unpickler reports a forbidden global (a class, a function like os.system)
        found = _UNSUPPORTED_GLOBAL.search(str(err))
        if found:
            raise CheckpointError(
                f"{path}: refused: the checkpoint holds pickled objects ({found.group(1)}) beyond tensors "
                "and plain containers, which could run code when loaded; deepstem loads only weights-only "
                "checkpoints"
            ) from None
        detail = _WEIGHTS_UNPICKLER_DETAIL.search(str(err))
        reason = detail.group(1).strip() if detail else _first_line(err)
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None
    except Exception as err:  # torch raises many kinds for a file that is not a checkpoint
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__})") from None
    if not isinstance(checkpoint, Mapping):
        kind = type(checkpoint).__name__
        raise CheckpointError(f"{path}: not a checkpoint (holds a {kind}, not a mapping)")
    return dict(checkpoint)


def check_checkpoint(path: str | Path) -> Path:
    """Raise :class:`CheckpointError` unless ``path`` is a checkpoint :func:`load_checkpoint` accepts.

    For files handed to Lightning (``trainer.fit(ckpt_path=...)``): it reports a bad file as one line
    before Lightning would fail with a traceback. Returns ``path`` as a :class:`~pathlib.Path`.
    """
    load_checkpoint(path)
    return Path(path)
