"""What the machine can do: bf16 support, training precision, where to train and score, and the environment record
saved with every run and benchmark."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import torch


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""  # not Linux: no model name, no known bf16 flags


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 instructions (AVX512-BF16 or AMX), where bf16 autocast trains ~2.4x faster."""
    flags = _cpuinfo()
    return " avx512_bf16" in flags or " amx_bf16" in flags


def cpu_model_name() -> str | None:
    """The CPU's model name from /proc/cpuinfo (None where there is none), for benchmark records."""
    lines = _cpuinfo().splitlines()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)


def uses_gpu(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()


def resolve_precision(precision: str | None, accelerator: str) -> str:
    """The Lightning precision: as given, else bf16 where the GPU or CPU does it natively, fp16 on older GPUs,
    fp32 on CPUs without bf16 instructions."""
    if precision:
        return precision
    if uses_gpu(accelerator):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_has_native_bf16() else "32-true"


def evaluation_device(accelerator: str) -> str:
    """Where rank 0 scores the best checkpoint after training: the first GPU of a GPU run, else the CPU."""
    return "cuda" if uses_gpu(accelerator) else "cpu"


def environment() -> dict:
    import lightning
    import timm
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "lightning": lightning.__version__, "numpy": np.__version__,
            "platform": platform.platform(), "cpus": os.cpu_count(), "cpu_model": cpu_model_name(),
            "cpu_native_bf16": cpu_has_native_bf16(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
