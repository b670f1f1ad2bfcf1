"""Training throughput of the real input pipeline + model on this machine (images/s and peak RSS), optionally side by
side with the course notebook's Keras model.

    python benchmarks/train_throughput.py [--model seed-cnn] [--size 180] [--batch 32] [--steps 40] [--out FILE]
        [--augment-on loader,device] [--settings W:T:CL:BF16,...] [--model-only] [--device cpu|cuda[:N]]
        [--peer PYTHON] [--rounds R]

Runs the same pieces `melanoma train` uses (decoded uint8 cache, channels_last model, Adam, bf16 autocast where the
device has native bf16) for a fixed number of steps after a warm-up, augmenting either per image in the DataLoader
(`loader`, torchvision v2) or per batch where the model trains (`device`, melanoma.train.augment: each image its own
random parameters). `--peer PYTHON` also runs /work/shared/peers/keras_seed_throughput.py (the notebook's baseline CNN
in TF/Keras, no augmentation, fp32) with that interpreter, e.g. a separate venv holding tensorflow-cpu, in the same run;
with `--rounds R` the peer and every setting are measured R times, interleaved, and the medians reported, so a busy
machine slows both alike. Targets (issue #20): seed-cnn with the `seed` preset >= 2x the Keras peer, side by side;
Lite0 `dermoscopy` no slower than before.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from _common import REPO, print_table, require_shared_data, write_results
from torch.utils.data import DataLoader

from melanoma.core.hardware import cpu_has_native_bf16
from melanoma.data.images import build_cache
from melanoma.data.sources import discover_folder
from melanoma.data.transforms import to_model_input, train_transform
from melanoma.models.networks import ModelSpec, build_model, default_normalization
from melanoma.train.augment import BatchAugment
from melanoma.train.loop import ArrayDataset

PEER_SCRIPT = REPO.parent / "shared" / "peers" / "keras_seed_throughput.py"


def measure(model_name: str, size: int, batch: int, steps: int, preset: str, workers: int, threads: int,
            channels_last: bool, bf16: bool, images: np.ndarray, labels: np.ndarray, device: str = "cpu",
            model_only: bool = False, augment_on: str = "loader") -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    mean, std = default_normalization(model_name)
    model = build_model(ModelSpec(model_name, 9, size, tuple(mean), tuple(std))).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    on_device = augment_on == "device"
    batch_augment = BatchAugment(preset, size) if on_device else None
    if batch_augment is not None:
        batch_augment.reseed(0, 0, 0)
    loader = DataLoader(ArrayDataset(images, labels, None if on_device else train_transform(preset, size)),
                        batch_size=batch, shuffle=True, num_workers=workers, persistent_workers=workers > 0,
                        drop_last=True, pin_memory=device != "cpu")
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
        if batch_augment is not None and not model_only:
            pixels = batch_augment(pixels)
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
            "augment_on": "none (model only)" if model_only else augment_on, "workers": workers, "threads": threads,
            "model_only": model_only, "channels_last": channels_last, "precision": "bf16-mixed" if bf16 else "32-true",
            "images_per_s": round(seen / seconds, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def run_peer(python: str, data_root: Path, steps: int) -> dict:
    """The Keras peer in its own interpreter: its last stdout line is a JSON record with images_per_s."""
    result = subprocess.run([python, str(PEER_SCRIPT), str(data_root), str(steps)], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"the Keras peer failed ({python}):\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _synchronize(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize(device)


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device != "cpu" else "cpu"


def _median_rows(rounds: list[list[dict]]) -> list[dict]:
    """Per setting, the row of the first round with images_per_s replaced by the median over rounds."""
    merged = []
    for rows in zip(*rounds):
        speeds = [row["images_per_s"] for row in rows]
        merged.append({**rows[0], "images_per_s": round(statistics.median(speeds), 1), "rounds": speeds})
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="seed-cnn")
    parser.add_argument("--size", type=int, default=180)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--preset", default="seed")
    parser.add_argument("--settings", default="0:2:1:0,0:2:1:1,1:2:1:1,0:2:0:1",
                        help="comma-separated workers:threads:channels_last:bf16 settings to compare")
    parser.add_argument("--augment-on", default="loader,device",
                        help="comma-separated augmentation paths to measure each setting with: loader, device")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--model-only", action="store_true",
                        help="train on one fixed batch: the model's own speed, without loading or augmentation")
    parser.add_argument("--peer", metavar="PYTHON",
                        help="also run the Keras peer (keras_seed_throughput.py) with this interpreter, side by side")
    parser.add_argument("--peer-steps", type=int, default=40, help="timed steps of the Keras peer (default: 40)")
    parser.add_argument("--rounds", type=int, default=1, help="measure everything this often, interleaved; medians")
    parser.add_argument("--out")
    args = parser.parse_args()
    paths = ["loader"] if args.model_only else [p.strip() for p in args.augment_on.split(",")]
    if not set(paths) <= {"loader", "device"}:
        parser.error(f"--augment-on takes loader and/or device, not {args.augment_on}")
    data_root = require_shared_data()
    index = discover_folder(data_root)
    records = [r for r in index.records if r.is_train]
    cache = build_cache(records, size=args.size)
    labels = np.asarray([index.classes.index(r.label) for r in records])
    rounds, peers = [], []
    for round_number in range(args.rounds):
        if args.peer:
            peers.append(run_peer(args.peer, data_root, args.peer_steps))
            print(f"round {round_number + 1}: Keras peer {peers[-1]['images_per_s']} images/s")
        rows = []
        for setting in args.settings.split(","):
            workers, threads, channels_last, bf16 = (int(v) for v in setting.split(":"))
            if bf16 and args.device == "cpu" and not cpu_has_native_bf16():
                print(f"skipping {setting}: this CPU has no native bf16")
                continue
            for path in paths:
                rows.append(measure(args.model, args.size, args.batch, args.steps, args.preset, workers, threads,
                                    bool(channels_last), bool(bf16), cache.images, labels, args.device,
                                    args.model_only, path))
                print_table(rows[-1:], list(rows[-1]))
        rounds.append(rows)
    rows = _median_rows(rounds) if args.rounds > 1 else rounds[0]
    payload: dict = {"results": rows}
    if peers:
        peer_speed = statistics.median(p["images_per_s"] for p in peers)
        for row in rows:
            row["x_keras_peer"] = round(row["images_per_s"] / peer_speed, 2)
        payload["peer"] = {"script": str(PEER_SCRIPT.relative_to(REPO.parent)), "python": args.peer,
                           "framework": peers[0]["framework"], "images_per_s": round(peer_speed, 2),
                           "rounds": [p["images_per_s"] for p in peers], "steps": args.peer_steps,
                           "what": "the notebook's baseline CNN in Keras, 180 px, batch 32, no augmentation, fp32"}
        print(f"\nKeras peer ({peers[0]['framework']}): {peer_speed:.2f} images/s (median of {len(peers)})")
    payload["load_average"] = list(_load_average())
    print()
    print_table(rows, list(rows[0]))
    suffix = ("" if args.device == "cpu" else "_gpu") + ("_model_only" if args.model_only else "")
    write_results(f"train_throughput_{args.model}{suffix}", payload, args.out)


def _load_average() -> tuple[float, ...]:
    """The machine's 1/5/15-minute load: other work sharing the cores slows every number here."""
    try:
        return tuple(round(v, 2) for v in os.getloadavg())
    except OSError:
        return ()


if __name__ == "__main__":
    main()
