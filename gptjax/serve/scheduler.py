"""The batcher: a bounded queue of jobs and ONE worker thread that runs them through the backend in batches.

Dynamic batching: the worker takes every queued job (up to max_batch) as one joined batch
(`Backend.stream_joined`, each row with its own settings and seed, so its tokens equal a solo run); jobs that
arrive while a batch runs wait for the next one. After a batch of k rows, the worker waits up to batch_wait
seconds for as many jobs as were waiting plus k (the clients just answered often send their next request
within milliseconds: without the wait, closed-loop clients split into two cohorts that alternate, each
running half-sized batches). Between decode chunks the worker hands each row's new tokens
to its job, drops rows whose client left or timed out, and stops the batch once no live row is left. If a
batch fails, each of its live jobs is re-run alone (same seed, same tokens; the ones already sent are
skipped), so one bad request fails only itself.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace

from gptjax.errors import GptjaxError
from gptjax.generate import GenerationRequest
from gptjax.tracing.spans import record_error, tracer


@dataclass
class Event:
    """What the worker tells a request handler: new tokens (with the finish reason once known) or an error."""

    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: BaseException | None = None
    index: int = 0  # the job's choice index in its request (set by Job.post)


STOPPED = "stop"  # the cancel reason of a row whose stop string the handler found: not counted as cancelled


class Job:
    """One completion in flight: its generation request, where its events go (an asyncio queue on the server's
    loop, shared by the choices of one HTTP request, each event tagged with the job's choice index), and whether
    it was cancelled (client gone, timeout, shutdown, or its stop string found)."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop, span: Any = None,
                 index: int = 0, events: asyncio.Queue[Event] | None = None, client: str = "") -> None:
        """client: who sent it (the server's per-client queue share counts its waiting jobs)."""
        self.request, self.loop, self.span, self.index, self.client = request, loop, span, index, client
        self.events: asyncio.Queue[Event] = events if events is not None else asyncio.Queue()
        self.sent = 0  # tokens handed over so far
        self.finished = False
        self.cancel_reason: str | None = None
        self.queued_at = time.perf_counter()
        self.withdraw: Callable[[Job], None] = lambda job: None  # the scheduler's: leave its queue at once

    @property
    def live(self) -> bool:
        """Still wants tokens."""
        return not self.finished and self.cancel_reason is None

    def cancel(self, reason: str) -> None:
        """Stop working for this job (safe from any thread): a queued job leaves the queue now (its slot is free
        for the next request), a running one is dropped by the worker at the next chunk."""
        if self.live:
            self.cancel_reason = reason
            self.withdraw(self)

    def post(self, event: Event) -> None:
        """Queue an event for the handler (thread-safe); a finish reason or an error ends the job."""
        if event.finish_reason or event.error is not None:
            self.finished = True
        event.index = self.index
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is gone
            pass


class DeviceLock:
    """A first-come-first-served lock around backend calls: the worker holds it for one chunk at a time, so a
    scoring call (log-probabilities, from another thread) runs between two chunks instead of waiting for the
    whole batch, and never at the same time as one (a plain Lock lets the worker take it back at once)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._waiting: deque[threading.Event] = deque()
        self._held = False

    def __enter__(self) -> None:
        with self._guard:
            if not self._held:
                self._held = True
                return
            turn = threading.Event()
            self._waiting.append(turn)
        turn.wait()  # the holder hands the lock over (still held) to the first waiter

    def __exit__(self, *exc: object) -> None:
        with self._guard:
            if self._waiting:
                self._waiting.popleft().set()
            else:
                self._held = False


def _locked(chunks: Any, lock: DeviceLock) -> Any:
    """The chunks of a stream, each computed while holding lock."""
    while True:
        with lock:
            chunk = next(chunks, None)
        if chunk is None:
            return
        yield chunk


class Waiting:
    """The jobs waiting for a batch, in order, and how many each client has waiting (a deque and a Counter that
    change together)."""

    def __init__(self) -> None:
        self.jobs: deque[Job] = deque()
        self.per_client: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self.jobs)

    def __iter__(self) -> Iterator[Job]:
        return iter(list(self.jobs))

    def add(self, jobs: list[Job]) -> None:
        """Queue jobs at the end."""
        self.jobs.extend(jobs)
        self.per_client.update(job.client for job in jobs)

    def first(self) -> Job:
        """The job waiting longest."""
        return self.jobs[0]

    def remove(self, job: Job | None = None) -> Job | None:
        """Take a job out (the first when None); None if it is not waiting."""
        try:
            job = self.jobs.popleft() if job is None else (self.jobs.remove(job) or job)
        except (IndexError, ValueError):
            return None
        self.per_client[job.client] -= 1
        if not self.per_client[job.client]:
            del self.per_client[job.client]  # bounded by the clients with a job waiting
        return job


class QueueFull(GptjaxError):
    """The bounded queue has no room: answer 429."""


class ShuttingDown(GptjaxError):
    """The server is stopping: answer 503."""


class Scheduler:
    """Runs jobs on `stream(requests) -> chunks` (a backend's stream_joined, weights bound) in one thread."""

    def __init__(self, stream: Callable[[Sequence[GenerationRequest]], Any], *, max_batch: int, max_queue: int,
                 max_per_client: int | None = None, batch_wait: float = 0.02,
                 on_batch: Callable[[int], None] | None = None,
                 on_cancel: Callable[[str], None] | None = None, on_chunk: Callable[[int], None] | None = None,
                 session: Callable[[list[Job], Any, list[Any]], None] | None = None,
                 device: DeviceLock | None = None) -> None:
        """stream runs a batch (dynamic batching); session, when given, runs a batch and takes queued jobs into
        it between chunks (continuous batching, gptjax.serve.continuous). max_per_client: jobs one client may have
        waiting (None: up to max_queue). Hooks: on_batch(rows at start),
        on_chunk(live rows per decode chunk), on_cancel(reason). device: held around each chunk's backend work."""
        self._stream, self.max_batch, self.max_queue, self._session = stream, max_batch, max_queue, session
        self.max_per_client = max_per_client or max_queue
        self.device = device or DeviceLock()
        self.on_chunk = on_chunk or (lambda n: None)
        self._on_batch, self._on_cancel = on_batch or (lambda n: None), on_cancel or (lambda reason: None)
        self._pending = Waiting()
        self._running: list[Job] = []
        self._cv = threading.Condition()
        self._closing = False
        self.batch_wait, self._target = batch_wait, 1  # gather until `_target` jobs wait, up to batch_wait s
        self._thread = threading.Thread(target=self._loop, name="gptjax-serve-worker", daemon=True)

    @property
    def depth(self) -> int:
        """Jobs waiting for a batch."""
        return len(self._pending)

    def start(self) -> None:
        """Start the worker thread."""
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job, or raise QueueFull when max_queue jobs are already waiting."""
        self.submit_all([job])

    def submit_all(self, jobs: list[Job]) -> None:
        """Queue all jobs (one request's choices, one client's) or none: QueueFull when they do not all fit in the
        queue or in their client's share of it."""
        with self._cv:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            if len(self._pending) + len(jobs) > self.max_queue:
                raise QueueFull(f"the queue is full ({len(self._pending)} of {self.max_queue} completions waiting, "
                                f"{len(jobs)} more asked)")
            mine = self._pending.per_client[jobs[0].client] if jobs else 0
            if mine + len(jobs) > self.max_per_client:
                raise QueueFull(f"this client's share of the queue is full ({mine} of its {self.max_per_client} "
                                f"completions waiting, {len(jobs)} more asked)")
            for job in jobs:
                job.withdraw = self._withdraw
            self._pending.add(jobs)
            self._cv.notify()

    def _withdraw(self, job: Job) -> None:
        """A cancelled job leaves the queue now (not when the worker next looks): its slot is free at once."""
        with self._cv:
            if self._pending.remove(job) is not None:
                self._dropped(job)

    def idle(self) -> bool:
        """No job waiting or running."""
        with self._cv:
            return not self._pending and not self._running

    def close(self, timeout: float = 10.0) -> None:
        """Cancel what is left (its handlers get an error) and stop the worker."""
        with self._cv:
            self._closing = True
            jobs = list(self._pending) + list(self._running)
            self._pending = Waiting()
            self._cv.notify()
        for job in jobs:
            if job.live:
                job.cancel("shutdown")
                job.post(Event(error=ShuttingDown("the server shut down before this request finished")))
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._run(batch)
            finally:
                with self._cv:
                    self._running = []
                    self._target = min(self.max_batch, len(self._pending) + len(batch))

    def _next_batch(self) -> list[Job] | None:
        """Wait for queued jobs; take the live ones, up to max_batch (None when closing)."""
        with self._cv:
            while True:
                while self._pending and not self._pending.first().live:
                    self._dropped(self._pending.remove())
                if self._closing:
                    return None
                if self._pending:
                    break
                self._cv.wait()
            self._gather()
            batch = []
            while self._pending and len(batch) < self.max_batch:
                job = self._pending.remove()
                if job.live:
                    batch.append(job)
                else:
                    self._dropped(job)
            self._running = batch
            return batch

    def _gather(self) -> None:
        """Wait (the condition releases the lock meanwhile) until _target jobs are queued or batch_wait passed."""
        end = time.monotonic() + self.batch_wait
        while len(self._pending) < self._target and not self._closing and time.monotonic() < end:
            self._cv.wait(end - time.monotonic())
        self._target = 1

    def _dropped(self, job: Job) -> None:
        if job.cancel_reason != STOPPED:
            self._on_cancel(job.cancel_reason or "finished")

    def take(self, fits: Callable[[GenerationRequest], bool], limit: int) -> list[Job]:
        """Up to `limit` queued live jobs whose request fits (in queue order), now counted as running."""
        taken: list[Job] = []
        with self._cv:
            for job in list(self._pending):
                if len(taken) >= limit:
                    break
                if not job.live:
                    self._pending.remove(job)
                    self._dropped(job)
                elif fits(job.request):
                    self._pending.remove(job)
                    taken.append(job)
            self._running += taken
        return taken

    def _run(self, batch: list[Job]) -> None:
        """Run a batch; if it fails, each job alone, so an error stays with the job that caused it."""
        self._on_batch(len(batch))
        try:
            if self._session is None:
                self._run_batch(batch)
            else:
                self._run_session(batch)
        except Exception as e:
            jobs = list(self._running)  # with the jobs a session took in
            if len(jobs) == 1:
                if jobs[0].live:
                    jobs[0].post(Event(error=e))
                return
            for job in jobs:
                if job.live:
                    try:
                        self._run_batch([job])
                    except Exception as single:
                        job.post(Event(error=single))

    def _run_session(self, jobs: list[Job]) -> None:
        spans = _batch_spans(jobs)
        try:
            self._session(jobs, self.take, spans)
        finally:
            for span in spans:
                span.end()

    def _run_batch(self, jobs: list[Job]) -> None:
        """Stream one batch, handing each live row its tokens (those not sent before), until no row is live."""
        slots = _batch_spans(jobs)
        token = otel_context.attach(trace.set_span_in_context(slots[0]))
        try:
            chunks = self._stream([job.request for job in jobs])
        finally:
            otel_context.detach(token)
        produced = [0] * len(jobs)
        try:
            for chunk in _locked(chunks, self.device):
                if chunk.phase == "decode":
                    self.on_chunk(sum(job.live for job in jobs))
                for row, job in enumerate(jobs):
                    new = chunk.tokens[row]
                    fresh = new[max(0, job.sent - produced[row]):]
                    produced[row] += len(new)
                    if job.live and (fresh or chunk.finish_reasons[row]):
                        job.sent += len(fresh)
                        job.post(Event(list(fresh), chunk.finish_reasons[row]))
                if not any(job.live for job in jobs):
                    break
            for job in jobs:
                if job.cancel_reason and job.cancel_reason != STOPPED:
                    self._on_cancel(job.cancel_reason)
        except BaseException as e:
            for span in slots:
                record_error(span, e)
            raise
        finally:
            with self.device:
                chunks.close()
            for span in slots:
                span.end()


def _batch_spans(jobs: list[Job]) -> list[Any]:
    """A `gptjax.serve.batch` span under each job's server span; the first (the backend's spans go under it)
    is linked from the others, so every request's trace leads to the batch that served it."""
    spans: list[Any] = []
    for row, job in enumerate(jobs):
        parent = trace.set_span_in_context(job.span) if job.span is not None else None
        links = [trace.Link(spans[0].get_span_context())] if spans else None
        span = tracer().start_span("gptjax.serve.batch", context=parent, links=links)
        if span.is_recording():
            span.set_attributes({"gptjax.batch_size": len(jobs), "gptjax.batch_row": row,
                                 "gptjax.queue_seconds": time.perf_counter() - job.queued_at})
        spans.append(span)
    return spans
