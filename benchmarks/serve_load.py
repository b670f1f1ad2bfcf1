"""Bounded load on a local `melanoma serve`: N single-image requests at concurrency C over loopback.

    python benchmarks/serve_load.py RUN [--requests 2000] [--concurrency 16] [--out FILE] [-- SERVE FLAGS...]

Starts the server itself on 127.0.0.1 (a free port) with the serve defaults plus any flags after `--` (e.g.
`-- --tta`, `-- --max-batch 8 --batch-wait-ms 2`), sends --warmup requests that are not counted, then exactly
--requests requests (it stops by itself, and never talks to any other address), and reports throughput, p50/p95/p99
latency, errors, the server's CPU time per request (little changed by other load on the machine, unlike latency),
the serve flags and the settings the server reported at /v1/model. Target (issue #18): zero errors
and p99 < 250 ms at 16 concurrent clients with the default flags and the Lite0 ONNX model on 2 cores. Any answer but
200 (a 503 from a full server, too) counts as an error.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter

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


async def load(base: str, requests: int, concurrency: int, image: bytes,
               headers: dict) -> tuple[list[float], Counter]:
    """Latencies (ms) of every request and how many got each answer ('200', '503', 'ConnectError', ...)."""
    import httpx

    latencies, outcomes = [], Counter()
    pending = iter(range(requests))

    async def worker(http):
        for _ in pending:
            start = time.perf_counter()
            try:
                response = await http.post("/v1/predict", files=[("files", ("x.jpg", image, "image/jpeg"))])
                outcome = str(response.status_code)
            except httpx.HTTPError as exc:
                outcome = type(exc).__name__
            latencies.append((time.perf_counter() - start) * 1000)
            outcomes[outcome] += 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=30, headers=headers, limits=limits) as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    return latencies, outcomes


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux /proc), which other load on the machine barely changes."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(run: str, serve_flags: list[str], log) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "melanoma", "serve", run, "--port", str(port), *serve_flags]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if server.poll() is not None:
            break
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return server, base
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.kill()
    log.seek(0)
    sys.exit(f"the server did not start: {' '.join(command)}\n{log.read().decode(errors='replace')[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=32, help="requests sent first and not counted (default: 32)")
    parser.add_argument("--out")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args, serve_flags = parser.parse_args(argv[:split]), argv[split + 1:]  # after --: flags for `melanoma serve`
    import httpx

    token = os.environ.get("MELANOMA_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    image = sample_image()
    with tempfile.TemporaryFile() as log:
        server, base = start_server(args.run, serve_flags, log)
        try:
            card = httpx.get(base + "/v1/model", headers=headers, timeout=10).json()
            asyncio.run(load(base, args.warmup, args.concurrency, image, headers))
            start, cpu_start = time.perf_counter(), cpu_seconds(server.pid)
            latencies, outcomes = asyncio.run(load(base, args.requests, args.concurrency, image, headers))
            seconds, cpu_end = time.perf_counter() - start, cpu_seconds(server.pid)
        finally:
            server.terminate()
            server.wait(timeout=30)
    serving = card.get("serving", {})
    row = {"requests": args.requests, "concurrency": args.concurrency, "backend": card.get("backend"),
           "tta": card.get("tta"), "max_batch": serving.get("max_batch"), "batch_wait_ms": serving.get("batch_wait_ms"),
           "workers": serving.get("inference_workers"), "seconds": round(seconds, 1),
           "requests_per_s": round(args.requests / seconds, 1),
           **{f"p{q}_ms": round(float(np.percentile(latencies, q)), 1) for q in (50, 95, 99)},
           "max_ms": round(max(latencies), 1), "errors": args.requests - outcomes.get("200", 0),
           "server_cpu_ms_per_request": (round((cpu_end - cpu_start) * 1000 / args.requests, 1)
                                         if cpu_start is not None and cpu_end is not None else None)}
    print_table([row], list(row))
    slug = re.sub(r"[^a-z0-9]+", "_", " ".join(serve_flags).lower()).strip("_")
    write_results("serve_load" + (f"_{slug}" if slug else ""),
                  {"run": args.run, "serve_flags": serve_flags, "warmup_requests": args.warmup,
                   "serving": serving, "outcomes": dict(outcomes), "results": [row]}, args.out)


if __name__ == "__main__":
    main()
