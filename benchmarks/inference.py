"""CPU inference speed: single-image latency (p50/p99, 1 thread) and batch throughput (all threads), PyTorch vs
onnxruntime, for seed-cnn (180 px) and EfficientNet-Lite0 at 224 px (issue #6's setting; the default recipe now
trains at 180 px, which costs about two thirds as much).

    python benchmarks/inference.py [--repeats 200] [--batch 32] [--out FILE]

Weights do not change speed, so the models are built directly (random init) and exported the way
`melanoma export` does. Thread settings: latency runs use 1 intra-op thread (torch.set_num_threads(1),
onnxruntime intra_op_num_threads=1); throughput runs use every core. Target (issue #6): Lite0 at 224 through
onnxruntime <= 15 ms p50 per image on one core. No TTA here (TTA costs 8 forward passes).
"""
from __future__ import annotations

import argparse
import io
import os
import time

import numpy as np
import torch
from _common import print_table, write_results

from melanoma.deploy.export import WithSoftmax
from melanoma.models.networks import ModelSpec, build_model, default_normalization

MODELS = (("seed-cnn", 180), ("tf_efficientnet_lite0", 224))


def onnx_session(model: torch.nn.Module, size: int, threads: int):
    import onnxruntime

    buffer = io.BytesIO()
    torch.onnx.export(model, (torch.rand(1, 3, size, size) * 255,), buffer, input_names=["pixels"],
                      output_names=["probabilities"], dynamic_axes={"pixels": {0: "batch"}}, opset_version=17,
                      dynamo=False)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])


def timings(run, batch: np.ndarray, repeats: int) -> np.ndarray:
    for _ in range(5):
        run(batch)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(batch)
        samples.append(time.perf_counter() - start)
    return np.asarray(samples) * 1000


def measure(name: str, size: int, repeats: int, batch_size: int) -> list[dict]:
    mean, std = default_normalization(name)
    model = WithSoftmax(build_model(ModelSpec(name, 9, size, tuple(mean), tuple(std)))).eval()
    single = (np.random.default_rng(0).random((1, 3, size, size)) * 255).astype(np.float32)
    batch = np.repeat(single, batch_size, axis=0)
    rows = []
    for threads, data, label in ((1, single, "latency, 1 image"), (os.cpu_count() or 1, batch, f"batch {batch_size}")):
        torch.set_num_threads(threads)
        session = onnx_session(model, size, threads)
        backends = {
            "pytorch": lambda x: model(torch.from_numpy(x)),
            "onnxruntime": lambda x: session.run(None, {"pixels": x}),
        }
        with torch.inference_mode():
            for backend, run in backends.items():
                ms = timings(run, data, repeats if len(data) == 1 else max(10, repeats // 10))
                rows.append({"model": name, "size": size, "backend": backend, "mode": label, "threads": threads,
                             "p50_ms": round(float(np.percentile(ms, 50)), 2),
                             "p99_ms": round(float(np.percentile(ms, 99)), 2),
                             "images_per_s": round(len(data) * 1000 / float(np.median(ms)), 1)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = [row for name, size in MODELS for row in measure(name, size, args.repeats, args.batch)]
    print_table(rows, list(rows[0]))
    write_results("inference", {"results": rows}, args.out)


if __name__ == "__main__":
    main()
