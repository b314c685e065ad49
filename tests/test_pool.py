"""simulations.pool: benchmark runs side by side in worker processes."""

from __future__ import annotations

import math

from simulations.pool import run_jobs


def test_every_job_runs_once_and_none_starts_after_stop() -> None:
    results: dict[str, float] = {}
    left = run_jobs({"a": 4.0, "b": 9.0}, math.sqrt, results.__setitem__, workers=2)
    assert results == {"a": 2.0, "b": 3.0} and left == []

    results.clear()
    # a and b start together; once one has ended, stop() is true, so c and d never start
    jobs = {"a": 4.0, "b": 9.0, "c": 16.0, "d": 25.0}
    left = run_jobs(jobs, math.sqrt, results.__setitem__, 2, lambda: bool(results))
    assert results == {"a": 2.0, "b": 3.0} and left == ["c", "d"]
