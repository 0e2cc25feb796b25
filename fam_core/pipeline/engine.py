"""Run jobs in batches: the part of running a model that every backend shares.

:func:`run_jobs` stacks jobs that share a :meth:`~fam_core.pipeline.jobs.Job.batch_key` into
one batch, hands it to the served model's backend (:mod:`fam_core.pipeline.backends`), which
predicts and explains in as few passes as it can, and splits the result back per job.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from fam_core.pipeline.backends import Batch
from fam_core.pipeline.jobs import Computed, Job, SearchJob, predict
from fam_core.pipeline.search import run_search_jobs

if TYPE_CHECKING:
    from fam_core.pipeline.models import ServedModel

__all__ = ["Computed", "Job", "predict", "run_jobs"]


def run_jobs(served: ServedModel, jobs: list[Job] | list[SearchJob]) -> list[Any]:
    """Run jobs sharing one :meth:`Job.batch_key` as one batch; one :class:`Computed` each
    (:class:`SearchJob` s: each its queries' explained neighbours,
    :func:`~fam_core.pipeline.search.run_search_jobs`)."""
    if not jobs:
        return []
    keys = {job.batch_key() for job in jobs}
    if len(keys) != 1:
        raise ValueError(f"run_jobs needs jobs with one batch key, got {sorted(keys)}")
    if isinstance(jobs[0], SearchJob):
        return run_search_jobs(served, jobs)  # type: ignore[arg-type]
    inputs = torch.cat([job.inputs for job in jobs])
    references = None
    if jobs[0].references is not None:
        references = torch.cat(
            [job.references.unsqueeze(0).expand(len(job), -1, -1) for job in jobs]  # type: ignore[union-attr]
        )
    classes = [c for job in jobs for c in [job.target_class] * len(job)]
    batch = Batch(inputs, jobs[0], classes, references)  # type: ignore[arg-type]
    computed = served.backend.run(served, batch)  # type: ignore[arg-type]
    return _split(computed, [len(job) for job in jobs])


def _split(computed: Computed, sizes: list[int]) -> list[Computed]:
    """``computed`` cut into consecutive windows of ``sizes`` items (every tensor of
    :class:`Computed` is batch-first)."""
    names = [item.name for item in dataclasses.fields(computed)]
    parts: list[Computed] = []
    start = 0
    for size in sizes:
        window = slice(start, start + size)
        parts.append(Computed(**{name: _window(getattr(computed, name), window) for name in names}))
        start += size
    return parts


def _window(value: object, window: slice) -> object:
    return value[window] if isinstance(value, torch.Tensor) else value
