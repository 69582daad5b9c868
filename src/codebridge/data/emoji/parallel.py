"""Run a stage's jobs over worker processes with a progress bar; results keep the order of the jobs."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

from tqdm import tqdm

J = TypeVar("J")
R = TypeVar("R")


class Pool:
    """One pool for the whole build (worker start-up paid once); ``workers=1`` runs in this process.

    Workers are spawned, not forked, so a parent that already imported torch (e.g. a test session) is safe.
    """

    def __init__(self, workers: int, progress: bool = True) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.workers = workers
        self.progress = progress
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> Pool:
        if self.workers > 1:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def map(self, fn: Callable[[J], R], jobs: Sequence[J], desc: str) -> list[R]:
        chunk = max(1, min(64, len(jobs) // (self.workers * 8)))
        results = map(fn, jobs) if self._pool is None else self._pool.map(fn, jobs, chunksize=chunk)
        done = []
        with tqdm(total=len(jobs), desc=desc, unit="file", disable=not self.progress) as bar:
            for result in results:
                done.append(result)
                bar.update()
        return done
