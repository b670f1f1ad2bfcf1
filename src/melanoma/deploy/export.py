"""``melanoma export RUN --format onnx``: the run's model as ONNX for CPU inference with onnxruntime.

The graph takes float32 pixels in [0, 255] (N x 3 x H x W, any batch size), normalises them itself and returns
softmax probabilities, and beside them the pooled penultimate features and the logits that the out-of-distribution
gate reads (``melanoma.models.ood``), so onnxruntime gates an image from the same call as PyTorch does. Class names,
input size, preprocessing and the run it came from are stored in the model's metadata with the SHA-256 of the
checkpoint it was exported from, so predict and serve refuse an ONNX file that belongs
to another run (or to an older checkpoint of this one). The export verifies itself: probabilities from onnxruntime
must match PyTorch within 1e-4 at batch sizes 1 and 16 (features and logits within 1e-4 of their scale), or
nothing is written.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import torch

from melanoma.core.errors import ExportError
from melanoma.core.io import atomic_write_bytes
from melanoma.core.text import display_name
from melanoma.runs.checkpoint import file_sha256
from melanoma.runs.layout import BEST, CHECKPOINT_DIR, ONNX_FILE
from melanoma.runs.run import Run

OPSET = 17          # widely supported by onnxruntime releases; all ops used here exist in it
TOLERANCE = 1e-4


OUTPUTS = ["probabilities", "features", "logits"]


class WithSoftmax(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features, logits = self.model.features_and_logits(pixels)
        return torch.softmax(logits, dim=1), features, logits


def export_onnx(run_dir: str | os.PathLike, opset: int = OPSET, log=print) -> Path:
    run = Run.load(run_dir, backend="torch", gate=False)
    model = WithSoftmax(run.model).eval()
    example = torch.rand(2, 3, run.image_size, run.image_size) * 255
    buffer = io.BytesIO()
    torch.onnx.export(model, (example,), buffer, input_names=["pixels"], output_names=OUTPUTS,
                      dynamic_axes={"pixels": {0: "batch"}} | {name: {0: "batch"} for name in OUTPUTS},
                      opset_version=opset, dynamo=False)
    onnx_bytes = _with_metadata(buffer.getvalue(), run)
    worst = verify_parity(model, onnx_bytes, run.image_size)
    path = atomic_write_bytes(Path(run_dir) / ONNX_FILE, onnx_bytes)
    log(f"wrote {display_name(path)} (opset {opset}); max |probability difference| vs PyTorch: "
        + ", ".join(f"batch {b}: {d:.2e}" for b, d in worst.items()))
    return path


def _with_metadata(onnx_bytes: bytes, run) -> bytes:
    import onnx

    proto = onnx.load_from_string(onnx_bytes)
    metadata = {"classes": json.dumps(run.classes), "image_size": str(run.image_size),
                "input": "float32 pixels in [0, 255], N x 3 x H x W, RGB; normalisation is inside the graph",
                "output": "probabilities: softmax, one column per class in 'classes' order; features: pooled "
                          "penultimate features; logits: pre-softmax scores (the out-of-distribution gate's input)",
                "model": run.config["model"]["name"], "run": str(Path(run.path).resolve().name),
                "checkpoint_sha256": file_sha256(Path(run.path) / CHECKPOINT_DIR / BEST),
                "producer": "melanoma"}
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


def verify_parity(model: torch.nn.Module, onnx_bytes: bytes, image_size: int) -> dict[int, float]:
    """Max |Δ probability| between PyTorch and onnxruntime at batch sizes 1 and 16; raises past the tolerance
    (features and logits: relative to their largest magnitude)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    worst = {}
    for batch in (1, 16):
        pixels = torch.rand(batch, 3, image_size, image_size, generator=generator) * 255
        with torch.no_grad():
            expected = [output.numpy() for output in model(pixels)]
        got = session.run(None, {"pixels": pixels.numpy()})
        worst[batch] = float(np.abs(expected[0] - got[0]).max())
        relative = max(float(np.abs(e - g).max() / max(1.0, np.abs(e).max())) for e, g in zip(expected[1:], got[1:]))
        if max(worst[batch], relative) >= TOLERANCE:
            raise ExportError(f"ONNX export disagrees with PyTorch by {worst[batch]:.2e} at batch {batch} "
                              f"(tolerance {TOLERANCE}); nothing written")
    return worst
