"""What a checkpoint holds, how it is written and read back (``weights_only=True``, one-line errors for a
file that is not a checkpoint), and whether a run can be resumed from it."""
from __future__ import annotations

import hashlib
import io
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from melanoma.core.errors import RunError
from melanoma.core.io import atomic_write_bytes
from melanoma.core.text import display_name
from melanoma.models.networks import ModelSpec, build_model
from melanoma.runs.layout import BEST, CHECKPOINT_DIR

CHECKPOINT_FORMAT = "melanoma-checkpoint-v1"


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


def save_best(run_dir: Path, model: nn.Module, spec: ModelSpec, classes: list[str], config: dict,
              epoch: int, metrics: dict) -> None:
    """best.pt: plain tensors and metadata (loadable with ``weights_only=True``), written atomically."""
    payload = {"format": CHECKPOINT_FORMAT, "model_state": {k: v.detach().cpu().clone()
                                                            for k, v in model.state_dict().items()},
               "spec": spec.to_dict(), "classes": list(classes), "epoch": int(epoch) + 1,
               "val_metrics": metrics, "config": config}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(run_dir / CHECKPOINT_DIR / BEST, buffer.getvalue())


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A best.pt checkpoint, loaded without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{display_name(path)}: checkpoint not found")
    try:
        payload = _torch_load(path)
    except Exception as exc:  # truncated zip, pickle error, not a torch file: all mean the same to the user
        raise RunError(f"{display_name(path)}: not a readable checkpoint (corrupt or truncated?): "
                       f"{torch_load_reason(exc)}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise RunError(f"{display_name(path)}: not a melanoma checkpoint")
    if not isinstance(payload.get("spec"), dict) or not isinstance(payload.get("model_state"), dict) \
            or not isinstance(payload.get("classes"), list) or not all(isinstance(c, str) for c in payload["classes"]):
        raise RunError(f"{display_name(path)}: not a melanoma checkpoint (its spec, weights or classes are missing)")
    return payload


def _torch_load(path: Path):
    with warnings.catch_warnings():  # torch's pickle-protocol warnings for a foreign file: the error says enough
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True)


def torch_load_reason(exc: BaseException) -> str:
    """One line for why ``torch.load(weights_only=True)`` refused a file, instead of torch's paragraph of advice."""
    text = str(exc)
    if "Weights only load failed" in text:
        return "it holds Python objects, not only tensors (not a checkpoint written by this tool)"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first[:160]}" if first else type(exc).__name__


def model_from_checkpoint(payload: dict) -> tuple[nn.Module, ModelSpec]:
    spec = ModelSpec.from_dict(payload["spec"])
    model = build_model(spec)
    try:
        model.load_state_dict(payload["model_state"])
    except RuntimeError as exc:
        raise RunError(f"checkpoint weights do not fit model '{spec.name}': {str(exc)[:300]}") from exc
    return model.eval(), spec


def check_resumable(last: Path) -> None:
    if not last.is_file():
        raise RunError(f"{display_name(last)}: no checkpoint to resume from")
    try:
        _torch_load(last)
    except Exception as exc:
        raise RunError(f"{display_name(last)}: checkpoint is corrupt or truncated ({torch_load_reason(exc)}); "
                       "nothing was changed. Start again with --overwrite") from exc


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
