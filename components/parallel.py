"""Run a function over many items in worker processes, in order, with a progress bar."""
from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
R = TypeVar("R")


def parallel_map(fn: Callable[[T], R], items: Sequence[T], workers: int, desc: str,
                 progress: bool = True, chunksize: int = 8) -> Iterator[R]:
    """Yield `fn(item)` for each item, in input order.

    `fn` must be picklable (a module-level function or a functools.partial of one). With one
    worker everything runs in this process, which keeps tracebacks simple and tests fast. An
    exception in any item propagates and cancels the remaining work.
    """
    bar = tqdm(total=len(items), desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    try:
        if workers <= 1 or len(items) <= 1:
            for item in items:
                yield fn(item)
                bar.update()
            return
        # spawn avoids forking a process that may hold Ray/torch threads.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            results: Iterable[R] = pool.map(fn, items, chunksize=max(1, chunksize))
            try:
                for result in results:
                    yield result
                    bar.update()
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    finally:
        bar.close()
