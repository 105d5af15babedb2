"""Continuous batching for the scheduler: run a batch of jobs on a backend's decode session
(`Backend.open_session`, where `supports_sessions`) and, between decode chunks, admit queued jobs into free
slots and drop rows whose client left or timed out.

Reports through the backend's observer (gptjax.tracing.observe), as its generate calls do: a `text_completion`
span per job with generate's attributes, prefill/decode spans under the oldest live job's and linked from the
others' (gptjax.tracing.session), and Prometheus metrics (forward time, TTFT from the request's arrival, time per
output token, requests by outcome, tokens). With a speculation (`gptjax serve --draft`) the session decodes speculatively: each chunk is a
`gptjax.speculate` span carrying the drafter, k and the chunk's proposed and accepted draft tokens, which also go
to the speculative token counters.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from gptjax.backends.base import Backend
from gptjax.generate import GenerationRequest
from gptjax.serve.scheduler import STOPPED, DeviceLock, Event, Job
from gptjax.tracing.observe import token_events
from gptjax.tracing.session import SessionSpans

Take = Callable[[Callable[[GenerationRequest], bool], int], list[Job]]
Chunk = list[tuple[Job, list[int], "str | None"]]  # (owner, new tokens, finish reason) per occupied row


class Session(Protocol):
    """What the runner needs of `Backend.open_session`'s result (gptjax.backends.jax.session.DecodeSession)."""

    owners: list[Any]  # per row: its job, or None for a free slot
    step: int  # decode steps (speculative: verify rounds) taken
    Tp: int  # padded prompt length: the sequence position of step 0
    draft: str | None  # the drafter's kind (speculative decoding), or None
    k: int  # draft tokens proposed per round
    proposed: int  # draft tokens proposed so far ...
    accepted: int  # ... and accepted

    @property
    def live(self) -> list[int]: ...

    @property
    def prompt_lengths(self) -> list[int]: ...  # a prompt length per prompt bucket (warm-up admits one of each)

    def fits(self, request: GenerationRequest) -> bool: ...

    def admit(self, request: GenerationRequest, owner: Any) -> Chunk: ...

    def first_chunk(self) -> Chunk: ...

    def run(self, chunk_size: int) -> Chunk: ...

    def cancel(self, owner: Any) -> None: ...


def row_buckets(max_batch: int) -> list[int]:
    """The row counts a server's sessions have: powers of 4 from 4 below max_batch's power of two, then it (16:
    [4, 16]). Each is one decode loop (and one admission copy per prompt bucket) to compile, so few; a lone request
    in 4 rows costs little more than in 1, as decode reads the weights once per step for all rows."""
    top = 1 << (max_batch - 1).bit_length()  # rows are a power of two
    return [b for b in (4 ** i for i in range(1, 16)) if b < top] + [top]


class SessionRunner:
    """Callable(jobs, take, spans): serve jobs, and jobs `take` hands over while room lasts, on one session."""

    def __init__(self, backend: Backend, weights: Any, *, chunk_size: int, max_batch: int,
                 on_cancel: Callable[[str], None], on_chunk: Callable[[int], None],
                 device: DeviceLock | None = None, speculation: Any = None, joins: bool = True) -> None:
        """device: held around each backend call (prefill, decode chunk), so scoring calls fit in between;
        speculation: a gptjax.speculative.Speculation (draft weights prepared by the backend's kind) to decode
        speculatively; joins: whether queued jobs join a running session (continuous batching) or wait for the
        next one (dynamic batching)."""
        self.backend, self.weights, self.chunk_size, self.max_batch = backend, weights, chunk_size, max_batch
        self.observer = backend.observer
        self.speculation, self.joins = speculation, joins
        self.on_cancel, self.on_chunk = on_cancel, on_chunk
        self.device = device or DeviceLock()
        self.spans = SessionSpans(self.observer)  # each job's text_completion span (one session at a time)
        self.rows = row_buckets(max_batch)

    def __call__(self, jobs: list[Job], take: Take, spans: list[Any]) -> None:
        self.spans = SessionSpans(self.observer)
        for job, span in zip(jobs, spans):
            self.spans.start(job, job.request, span)
        try:
            session = self._open(jobs)
            while session.live:
                self._drop_cancelled(session)
                if self.joins:
                    self._admit(session, take)
                if not session.live:
                    break
                self._decode(session)
        except BaseException as e:
            self.spans.close(e)
            raise
        finally:
            self.spans.close()

    def _open(self, jobs: list[Job]) -> Session:
        """The session of the starting jobs, prefilled together; their first tokens delivered."""
        lengths = [len(j.request.prompts[0]) for j in jobs]
        with self.device, self.spans.forward_pass("prefill", "prefill", jobs, max(lengths)) as span:
            session = self.open([j.request for j in jobs], jobs)
            first = session.first_chunk()
        self.observer.report_prefill(span.seconds, lengths)
        self._deliver(session, first, ttft=True)
        return session

    def _decode(self, session: Session) -> None:
        """One decode chunk of the live rows in its span, reported; its tokens delivered."""
        before, drafts = session.step, (session.proposed, session.accepted)
        self.on_chunk(len(session.live))
        name = "speculate" if session.draft else "decode"
        jobs = [session.owners[row] for row in session.live]
        seq_len = max(len(j.request.prompts[0]) + j.sent for j in jobs)  # the longest sequence, as generate counts
        with self.device, self.spans.forward_pass(name, "decode", jobs, seq_len) as span:
            chunk = session.run(self.chunk_size)
            steps = self._steps(session, before, chunk)
            span.set({"gptjax.steps": steps} | self._speculated(session, *drafts))
            token_events(span, seq_len, steps)
        self.observer.report_decode(span.seconds, steps, sum(len(t) for _, t, _ in chunk), seq_len)
        self._deliver(session, chunk)

    @staticmethod
    def _steps(session: Session, before: int, chunk: Chunk) -> int:
        """A chunk's steps: decode steps, or for a speculative one its most tokens in a row (as generate counts)."""
        if session.draft is None:
            return session.step - before
        return max((len(tokens) for _, tokens, _ in chunk), default=0)

    def _speculated(self, session: Session, proposed: int, accepted: int) -> dict[str, Any]:
        """A speculative chunk's span attributes (drafter, k, draft tokens proposed and accepted since the counts
        `proposed` and `accepted`); its tokens go to the speculative counters too."""
        if session.draft is None:
            return {}
        proposed, accepted = session.proposed - proposed, session.accepted - accepted
        self.observer.report_speculation(session.draft, proposed, accepted)
        return {"gptjax.draft": session.draft, "gptjax.spec.k": session.k, "gptjax.spec.proposed": proposed,
                "gptjax.spec.accepted": accepted}

    def open(self, requests: list[GenerationRequest], owners: list[Any], rows: int | None = None) -> Session:
        """A session of these requests (one owner each) in `rows` rows (default: slots(len(requests))), shaped
        for any request (headroom None), so its programs are among the ones warm-up compiles."""
        spec = {} if self.speculation is None else {"speculation": self.speculation}
        return self.backend.open_session(self.weights, requests, owners, slots=rows or self.slots(len(requests)),
                                         headroom=None, **spec)

    def slots(self, jobs: int) -> int:
        """Rows of a session starting with `jobs` jobs: the smallest of row_buckets holding twice as many (up to
        max_batch) when others may join, else as many."""
        wanted = min(self.max_batch, 2 * jobs) if self.joins else jobs
        return next(b for b in self.rows if b >= wanted)

    def _admit(self, session: Session, take: Take) -> None:
        """Move queued jobs that fit into free slots, each prefilled alone (a failure fails only that job)."""
        room = min(session.owners.count(None), self.max_batch - len(session.live))  # rows are a power of two
        for job in take(session.fits, max(0, room)):
            n = len(job.request.prompts[0])
            self.spans.start(job, job.request, job.span)
            try:
                with self.device, self.spans.forward_pass("prefill", "prefill", [job], n) as span:
                    first = session.admit(job.request, job)
            except Exception as e:
                job.post(Event(error=e))
                self._observe_end(job, "error", e)
                continue
            self.observer.report_prefill(span.seconds, [n])
            self._deliver(session, first, ttft=True)

    def _drop_cancelled(self, session: Session) -> None:
        for row in session.live:
            job = session.owners[row]
            if not job.live:
                with self.device:
                    session.cancel(job)
                if job.cancel_reason == STOPPED:  # its stop string ended it: a normal end
                    self._observe_end(job, "ok", reason=STOPPED)
                    continue
                self.on_cancel(job.cancel_reason or "cancelled")
                self._observe_end(job, "cancelled")

    def _deliver(self, session: Session, chunk: Chunk, ttft: bool = False) -> None:
        for job, tokens, reason in chunk:
            if not job.live:
                continue
            if ttft:
                self.observer.report_first_token(time.perf_counter() - job.queued_at)
            job.sent += len(tokens)
            job.post(Event(list(tokens), reason))
            if reason:
                self._observe_end(job, "ok", reason=reason)

    def _observe_end(self, job: Job, outcome: str, error: BaseException | None = None, reason: str | None = None
                     ) -> None:
        self.spans.end(job, job.sent, reason, error)
        self.observer.report_request(time.perf_counter() - job.queued_at, len(job.request.prompts[0]), job.sent,
                                     outcome, error)
