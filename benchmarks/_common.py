"""Helpers shared by the benchmark scripts: the shared data location, a results table and JSON output."""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "isic-9class-180px"
EXTRA_MANIFEST = REPO.parent / "shared" / "data" / "isic-extra" / "manifest.csv"
TRUTH_FILES = sorted((REPO.parent / "shared" / "data" / "groundtruth").glob("*.csv"))
HAM10000_METADATA = REPO.parent / "shared" / "data" / "groundtruth" / "HAM10000_metadata.csv"  # lesion_id


def require_shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        sys.exit(f"benchmark needs {SHARED_DATA}")
    return SHARED_DATA


def default_sources() -> list[Path]:
    """The README main job's data: the course set and the official-label extra images."""
    if not EXTRA_MANIFEST.is_file():
        sys.exit(f"benchmark needs {EXTRA_MANIFEST}")
    return [require_shared_data(), EXTRA_MANIFEST]


def machine() -> dict:
    import os

    import torch

    from melanoma.core.hardware import cpu_has_native_bf16, cpu_model_name

    # training takes ~2.4x as long without bf16 instructions, so a timing is only comparable on the same kind
    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "cpu_model": cpu_model_name(),
            "cpu_native_bf16": cpu_has_native_bf16(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(_fmt(row.get(c)).ljust(w) for c, w in zip(columns, widths)) + " |")


def write_results(name: str, payload: dict, out: str | None) -> Path:
    path = Path(out) if out else REPO / "benchmarks" / "results" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload | {"machine": machine()}, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return "" if value is None else str(value)
