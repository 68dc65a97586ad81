"""Micro-batching: concurrent requests are gathered into one model batch.

One collector task on the event loop takes the first waiting request, then gathers more until the batch
holds ``max_batch_size`` inputs or ``max_wait_ms`` have passed, and runs the batch in the one model thread
(the model is never used by two threads at once). Requests that arrive while the model works wait in the
queue and form the next batch without further waiting, so under load batches fill up by themselves.

Inputs are checked before they are queued (see :mod:`multitune.serving.inputs`); a batch that still fails
fails all its requests at once, with one log record.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("multitune.serving")


class QueueFullError(Exception):
    """More inputs are waiting for the model than the server accepts (``max_queue``)."""


class BatchFailedError(Exception):
    """The model call of the request's batch raised; the cause is logged once, by the batcher."""


@dataclass
class _Job:
    inputs: Sequence[Any]
    plan: Sequence[Sequence[str]]
    future: asyncio.Future = field(repr=False)


class MicroBatcher:
    """Runs ``predict(inputs, plan) -> predictions`` on batches gathered from concurrent requests.

    Args:
        predict: the synchronous model call; gets the inputs of all gathered requests (and each input's
            tasks) and returns one prediction per input.
        max_batch_size: most inputs per call (a single larger request is passed whole; ``predict`` splits it).
        max_wait_ms: how long a batch waits for more requests after its first one.
        max_queue: most inputs waiting; :meth:`submit` raises :class:`QueueFullError` beyond it.
        on_batch: called with (requests, inputs) of every batch run (metrics).
    """

    def __init__(self, predict: Callable[[list, list], list], max_batch_size: int, max_wait_ms: float,
                 max_queue: int, on_batch: Callable[[int, int], None] | None = None):
        self.predict = predict
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.queued_inputs = 0
        self._jobs: collections.deque[_Job] = collections.deque()
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        """Start the collector on the running event loop (the server's startup)."""
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="multitune-model")
        self._task = asyncio.get_running_loop().create_task(self._collect())

    async def stop(self) -> None:
        """Stop the collector; waiting requests fail with a cancellation."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._jobs:
            job = self._jobs.popleft()
            if not job.future.done():
                job.future.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def submit(self, inputs: Sequence[Any], plan: Sequence[Sequence[str]]) -> list:
        """Queue one request and wait for its predictions.

        Raises:
            QueueFullError: the queue already holds ``max_queue`` inputs.
            BatchFailedError: ``predict`` raised for the batch this request was in (logged by the batcher).
        """
        if self._arrived is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        if self.queued_inputs + len(inputs) > self.max_queue:
            raise QueueFullError(f"{self.queued_inputs} inputs are waiting (max_queue {self.max_queue})")
        job = _Job(inputs, plan, asyncio.get_running_loop().create_future())
        self.queued_inputs += len(inputs)
        self._jobs.append(job)
        self._arrived.set()
        try:
            return await job.future
        finally:
            self.queued_inputs -= len(inputs)

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._jobs:
                self._arrived.clear()
                await self._arrived.wait()
            batch = [self._jobs.popleft()]
            size = len(batch[0].inputs)
            deadline = loop.time() + self.max_wait
            while size < self.max_batch_size:
                if not self._jobs:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    self._arrived.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._arrived.wait(), remaining)
                    continue
                if size + len(self._jobs[0].inputs) > self.max_batch_size:
                    break  # the next request starts the next batch
                job = self._jobs.popleft()
                batch.append(job)
                size += len(job.inputs)
            batch = [j for j in batch if not j.future.done()]  # clients that gave up
            if batch:
                await self._run(batch)

    async def _run(self, batch: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        inputs = [x for j in batch for x in j.inputs]
        plan = [p for j in batch for p in j.plan]
        try:
            predictions = await loop.run_in_executor(self._executor, self.predict, inputs, plan)
        except Exception as exc:
            # inputs were checked before they were queued, so this is a bug: every request of the batch fails
            # once, with one log record; none is retried (a retry per request made one bad input cost every
            # request of its batch a model pass of its own)
            logger.error("prediction failed for a batch of %d requests (%d inputs)", len(batch), len(inputs),
                         exc_info=exc)
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(BatchFailedError(f"prediction failed for a batch of {len(batch)} "
                                                              f"requests"))
            return
        if self.on_batch is not None:
            self.on_batch(len(batch), len(inputs))
        start = 0
        for job in batch:
            if not job.future.done():
                job.future.set_result(predictions[start:start + len(job.inputs)])
            start += len(job.inputs)
