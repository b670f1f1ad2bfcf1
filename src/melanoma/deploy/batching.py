"""Dynamic micro-batching for the server: concurrent requests' images gathered for a few milliseconds and run as one
model call on one of a few inference workers, and the gate that turns requests away (503) beyond the queue."""
from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

LOG = logging.getLogger("melanoma.serve")


class Gate:
    """At most ``capacity`` requests in flight (decoding, waiting for a batch, predicting); beyond that, 503."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.inside = 0

    def try_enter(self) -> bool:
        if self.inside >= self.capacity:
            return False
        self.inside += 1
        return True

    def leave(self) -> None:
        self.inside -= 1


@dataclass
class Job:
    images: object           # N x H x W x 3 uint8, already at the model's input size
    future: Future


STOP = object()


class Batcher:
    """Dynamic micro-batching. Each request hands in its images as one job, and one gatherer thread deals the jobs
    out to ``workers`` inference threads. When a worker is free and nothing was waiting, the gatherer waits up to
    ``wait_s`` for more jobs to arrive (stopping early at ``max_batch`` images); then every free worker takes a fair
    share of what is waiting (the images waiting divided by the number of workers, at most ``max_batch``, whole jobs
    only) as ONE ``predict`` call, and the rest waits for the next worker to come free. Every job gets its own rows
    back. Shares keep all cores busy and the batches even: a worker that took the whole queue alone would leave the
    others idle and make every request in it wait for the longest batch. At most ``workers`` model calls run at once;
    a job larger than ``max_batch`` is a call of its own. If a call fails, its jobs are retried one by one, so an
    error lands only on the request that causes it."""

    def __init__(self, predict, workers: int, max_batch: int, wait_s: float):
        self.predict, self.workers, self.max_batch, self.wait_s = predict, workers, max_batch, wait_s
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.free = threading.Semaphore(workers)  # workers not running a call
        self.pool: ThreadPoolExecutor | None = None
        self.lock = threading.Lock()

    def submit(self, images) -> Future:
        self._start()
        job = Job(images=images, future=Future())
        self.jobs.put(job)
        return job.future

    def _start(self) -> None:
        with self.lock:
            if self.pool is None:  # started on first use, so merely building an app starts no thread
                self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="melanoma-inference")
                threading.Thread(target=self._gather, args=(self.pool,), name="melanoma-batcher", daemon=True).start()

    def stop(self) -> None:
        with self.lock:
            if self.pool is not None:
                self.jobs.put(STOP)
                self.pool.shutdown(wait=False)
                self.pool = None

    def _gather(self, pool: ThreadPoolExecutor) -> None:
        pending: deque = deque()  # jobs taken off the queue and not yet dealt out, in arrival order
        while True:
            self.free.acquire()
            if not pending:  # idle until a job comes, then give others a moment to join it
                pending.append(self.jobs.get())
                self._wait_for_more(pending)
            self._drain(pending)
            if pending[0] is STOP:
                return
            free = 1
            while free < self.workers and self.free.acquire(blocking=False):
                free += 1
            waiting = sum(len(job.images) for job in pending if job is not STOP)
            share = max(1, min(self.max_batch, math.ceil(waiting / self.workers)))
            calls = [jobs for jobs in (take_share(pending, share) for _ in range(free)) if jobs]
            for _ in range(free - len(calls)):
                self.free.release()
            for jobs in calls:
                try:
                    pool.submit(self._call, jobs)
                except RuntimeError as exc:  # the server is shutting down
                    self.free.release()
                    for job in jobs:
                        job.future.set_exception(exc)

    def _wait_for_more(self, pending: deque) -> None:
        deadline = time.monotonic() + self.wait_s
        while pending[-1] is not STOP and sum(len(job.images) for job in pending) < self.max_batch:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                pending.append(self.jobs.get(timeout=remaining))
            except queue.Empty:
                return

    def _drain(self, pending: deque) -> None:
        while pending[-1] is not STOP:
            try:
                pending.append(self.jobs.get_nowait())
            except queue.Empty:
                return

    def _call(self, jobs: list[Job]) -> None:
        try:
            self._run(jobs)
        finally:
            self.free.release()

    def _run(self, jobs: list[Job]) -> None:
        import numpy as np

        started = time.perf_counter()
        try:
            probabilities = self.predict(np.concatenate([job.images for job in jobs]))
        except Exception as exc:
            if len(jobs) == 1:
                jobs[0].future.set_exception(exc)
            else:
                for job in jobs:
                    self._run([job])
            return
        LOG.debug("model call: %d image(s) from %d request(s), %.0f ms", len(probabilities), len(jobs),
                  (time.perf_counter() - started) * 1000)
        start = 0
        for job in jobs:
            job.future.set_result(probabilities[start:start + len(job.images)])
            start += len(job.images)


def take_share(pending: deque, share: int) -> list[Job]:
    """Whole jobs from the front of ``pending`` up to ``share`` images (at least one job); cancelled ones dropped."""
    jobs, size = [], 0
    while pending and pending[0] is not STOP:
        if jobs and size + len(pending[0].images) > share:
            break
        job = pending.popleft()
        if job.future.set_running_or_notify_cancel():  # else its client went away
            jobs.append(job)
            size += len(job.images)
    return jobs
