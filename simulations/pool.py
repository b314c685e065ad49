"""Run a benchmark's independent runs side by side, in worker processes of one torch thread each.

On this 2-core machine two single-threaded processes train about twice as
fast as one process with two threads, whose threads spin-wait on each other
whenever the machine is busy (measured: 10x slower under load). Each worker
keeps its cached base model (:mod:`fedlora.runtime`) from one run to the next,
as a simulation's workers do; a run must therefore reset what it changes
(e.g. load the initial adapter before it starts).
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import TypeVar

import torch

Key = TypeVar("Key")
Job = TypeVar("Job")
Result = TypeVar("Result")


def _start_worker() -> None:
    """One torch thread; third-party notices off, as in fedlora's apps."""
    import fedlora.quiet  # noqa: F401

    torch.set_num_threads(1)


def run_jobs(
    jobs: Mapping[Key, Job],
    work: Callable[[Job], Result],
    done: Callable[[Key, Result], None],
    workers: int,
    stop: Callable[[], bool] = lambda: False,
) -> list[Key]:
    """``work(job)`` for each job, in order, at most ``workers`` at a time; ``done(key, result)`` here as each ends.

    ``work`` must be a module-level function (it is pickled to a spawned
    process). A job is not started once ``stop()`` is true: the keys of those
    jobs are returned, so a benchmark can say what it left out. An exception in
    a job is raised here once the jobs already running have ended; no other job starts.
    """
    queue, left = list(jobs), []
    running: dict[Future[Result], Key] = {}
    context = multiprocessing.get_context("spawn")  # no fork of a process that has torch threads running
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker) as pool:
        while queue or running:
            while queue and len(running) < workers:
                key = queue.pop(0)
                if stop():
                    left.append(key)
                else:
                    running[pool.submit(work, jobs[key])] = key
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                done(running.pop(future), future.result())
    return left
