"""Training throughput of the real input pipeline + model on this machine (images/s and peak RSS).

    python benchmarks/train_throughput.py [--model seed-cnn] [--size 180] [--batch 32] [--steps 40] [--out FILE]

Runs the same pieces `melanoma train` uses (decoded uint8 cache, per-image v2 augmentation, channels_last model,
Adam, bf16 autocast where the CPU has native bf16) for a fixed number of steps after a warm-up. Target (issue #3):
seed-cnn at 180x180, batch 32, >= 60 images/s on 2 cores (TF/Keras does about 27-30 here).
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from _common import print_table, require_shared_data, write_results
from melanoma.data import build_cache
from melanoma.sources import discover_folder
from melanoma.models import ModelSpec, build_model, default_normalization
from melanoma.hardware import cpu_has_native_bf16
from melanoma.loop import ArrayDataset
from melanoma.transforms import to_model_input, train_transform


def measure(model_name: str, size: int, batch: int, steps: int, preset: str, workers: int, threads: int,
            channels_last: bool, bf16: bool, images: np.ndarray, labels: np.ndarray, device: str = "cpu",
            model_only: bool = False) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    mean, std = default_normalization(model_name)
    model = build_model(ModelSpec(model_name, 9, size, tuple(mean), tuple(std))).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    loader = DataLoader(ArrayDataset(images, labels, train_transform(preset, size)), batch_size=batch, shuffle=True,
                        num_workers=workers, persistent_workers=workers > 0, drop_last=True,
                        pin_memory=device != "cpu")
    model.train()
    seen, start, warmup = 0, None, 3
    iterator = iter(loader)
    pixels, targets = next(iterator)
    for step in range(steps + warmup):
        if step and not model_only:  # model_only: the first batch again and again, no loading or augmentation
            try:
                pixels, targets = next(iterator)
            except StopIteration:
                iterator = iter(loader)
                pixels, targets = next(iterator)
        if step == warmup:
            _synchronize(device)
            start = time.perf_counter()
        pixels, targets = pixels.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(to_model_input(pixels, channels_last)), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= warmup:
            seen += len(targets)
    _synchronize(device)
    seconds = time.perf_counter() - start
    return {"model": model_name, "device": _device_name(device), "size": size, "batch": batch, "preset": preset,
            "workers": workers, "threads": threads, "model_only": model_only, "channels_last": channels_last,
            "precision": "bf16-mixed" if bf16 else "32-true",
            "images_per_s": round(seen / seconds, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def _synchronize(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize(device)


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device != "cpu" else "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="seed-cnn")
    parser.add_argument("--size", type=int, default=180)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--preset", default="seed")
    parser.add_argument("--settings", default="0:2:1:0,0:2:1:1,1:2:1:1,0:2:0:1",
                        help="comma-separated workers:threads:channels_last:bf16 settings to compare")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--model-only", action="store_true",
                        help="train on one fixed batch: the model's own speed, without loading or augmentation")
    parser.add_argument("--out")
    args = parser.parse_args()
    index = discover_folder(require_shared_data())
    records = [r for r in index.records if r.is_train]
    cache = build_cache(records, size=args.size)
    labels = np.asarray([index.classes.index(r.label) for r in records])
    rows = []
    for setting in args.settings.split(","):
        workers, threads, channels_last, bf16 = (int(v) for v in setting.split(":"))
        if bf16 and args.device == "cpu" and not cpu_has_native_bf16():
            print(f"skipping {setting}: this CPU has no native bf16")
            continue
        rows.append(measure(args.model, args.size, args.batch, args.steps, args.preset, workers, threads,
                            bool(channels_last), bool(bf16), cache.images, labels, args.device, args.model_only))
        print_table(rows[-1:], list(rows[-1]))
    print()
    print_table(rows, list(rows[0]))
    suffix = ("" if args.device == "cpu" else "_gpu") + ("_model_only" if args.model_only else "")
    write_results(f"train_throughput_{args.model}{suffix}", {"results": rows}, args.out)


if __name__ == "__main__":
    main()
