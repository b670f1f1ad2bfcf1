"""Decode the shared dataset into the in-memory cache and report time and memory.

    python benchmarks/data_loading.py [--size 180] [--workers N] [--out FILE]

Target (issue #2): 2,400 images at 180x180 load in well under a minute on 2 cores, using about their raw size.
"""
from __future__ import annotations

import argparse
import resource
import time

from _common import print_table, require_shared_data, write_results

from melanoma.data.images import build_cache
from melanoma.data.sources import discover_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=180)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--out")
    args = parser.parse_args()
    index = discover_folder(require_shared_data())
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    cache = build_cache(index.records, size=args.size, workers=args.workers)
    seconds = time.perf_counter() - start
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row = {"images": len(index.records), "size": args.size, "seconds": round(seconds, 2),
           "images_per_s": round(len(index.records) / seconds, 1), "cache_mib": round(cache.nbytes / 2**20, 1),
           "peak_rss_growth_mib": round(rss_after - rss_before, 1), "errors": len(cache.errors)}
    print_table([row], list(row))
    write_results("data_loading", {"results": [row]}, args.out)


if __name__ == "__main__":
    main()
