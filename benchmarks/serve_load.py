"""Bounded load on a local `melanoma serve`: N single-image requests at concurrency C over loopback.

    python benchmarks/serve_load.py RUN [--requests 2000] [--concurrency 16] [--out FILE]

Starts the server itself on 127.0.0.1 (a free port), sends exactly --requests requests (it stops by itself, and
never talks to any other address), then reports requests/s, p50/p99 latency and errors. Target (issue #7): zero
errors and p99 < 250 ms with the Lite0 ONNX model on 2 cores. Requests that find the server full get 503 and count
as errors here.
"""
from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import time

import numpy as np

from _common import print_table, write_results


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def sample_image() -> bytes:
    import io

    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 255, (180, 180, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


async def load(base: str, requests: int, concurrency: int, image: bytes) -> tuple[list[float], int]:
    import httpx

    latencies, errors = [], 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)

    async def worker(http):
        nonlocal errors
        while not queue.empty():
            queue.get_nowait()
            start = time.perf_counter()
            try:
                response = await http.post("/v1/predict", files=[("files", ("x.jpg", image, "image/jpeg"))])
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append((time.perf_counter() - start) * 1000)
            errors += not ok

    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    return latencies, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--no-tta", action="store_true", help="serve without test-time augmentation")
    parser.add_argument("--out")
    args = parser.parse_args()
    port = free_port()
    command = [sys.executable, "-m", "melanoma", "serve", args.run, "--port", str(port)]
    server = subprocess.Popen(command + (["--no-tta"] if args.no_tta else []),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import httpx

        base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        start = time.perf_counter()
        latencies, errors = asyncio.run(load(base, args.requests, args.concurrency, sample_image()))
        seconds = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(timeout=30)
    row = {"requests": args.requests, "concurrency": args.concurrency, "tta": not args.no_tta,
           "seconds": round(seconds, 1),
           "requests_per_s": round(args.requests / seconds, 1),
           "p50_ms": round(float(np.percentile(latencies, 50)), 1),
           "p99_ms": round(float(np.percentile(latencies, 99)), 1), "errors": errors}
    print_table([row], list(row))
    write_results(f"serve_load{'_no_tta' if args.no_tta else ''}", {"run": args.run, "results": [row]}, args.out)


if __name__ == "__main__":
    main()
