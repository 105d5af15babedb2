"""The /v1/completions pipeline: authorize, check readiness, parse the body (gptjax.serve.protocol), queue one
job per choice on the scheduler, and answer as one JSON body or as Server-Sent Events in OpenAI's chunk format,
with log-probabilities scored between the worker's chunks. Also the request checks the other routes share
(gptjax.serve.guards: API key, readiness, a bounded body). Every failure reaches the client as an OpenAI error object, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gptjax.errors import GptjaxError
from gptjax.scoring import Scores
from gptjax.serve.completions import Choice, TokenText, logprobs_block, usage
from gptjax.serve.guards import authorize, check_ready, client_of, read_body
from gptjax.serve.protocol import MAX_LOGPROBS, Completion, RequestError, parse_completion
from gptjax.serve.scheduler import STOPPED, Event, Job, QueueFull, ShuttingDown
from gptjax.serve.state import ServerState
from gptjax.speculative import ModelDraft, Speculation
from gptjax.tracing.spans import record_error, tracer

log = logging.getLogger("gptjax.serve")
ACCESS = "gptjax.access"  # ASGI scope key: what a route tells the access-log line (completion tokens)


async def completions(request: Request, state: ServerState) -> Response:
    """Authorize, check readiness, read and validate the body, queue the job, answer (JSON or SSE)."""
    span = _server_span(request)
    state.inflight += 1
    handed_over, jobs = False, None
    try:
        authorize(request, state.options.api_key)
        check_ready(state)
        body = await read_body(request, state.options.max_body_bytes)  # parsed and encoded off the event loop
        completion = await asyncio.to_thread(parse_completion, body, state.limits, state.model.tokenizer)
        _check_speculative(completion, state.model.speculation)
        jobs = _Jobs(completion, asyncio.get_running_loop(), span, client_of(request, state.options.api_key))
        _submit(state, jobs.jobs)
        head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
                "model": state.options.model_id}
        if completion.stream:
            handed_over = True  # the stream ends the span and the in-flight count
            access = request.scope.setdefault(ACCESS, {})
            return StreamingResponse(_sse(state, jobs, completion, head, span, access), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        response = await _collect(request, state, jobs, completion, head)
        _end(span, response.status_code)
        return response
    except BaseException as e:
        if jobs is not None:  # one choice failed, or the scoring: the other choices' work is wasted
            jobs.cancel("error")
        status = e.status if isinstance(e, RequestError) else 500
        if status >= 500:
            record_error(span, e)
        _end(span, status)
        raise
    finally:
        if not handed_over:
            state.inflight -= 1


def _check_speculative(completion: Completion, spec: Speculation | None) -> None:
    """A 400 for what a speculative server cannot serve exactly: penalties and logit bias (the verify step scores
    the target's raw distribution) and, with a draft model, a prompt plus max_tokens beyond its context."""
    if spec is None:
        return
    for r in completion.requests:
        sp = r.sampling
        for name, used in (("presence_penalty", sp.presence_penalty), ("frequency_penalty", sp.frequency_penalty),
                           ("logit_bias", sp.logit_bias)):
            if used:
                raise RequestError(400, f"{name} is not supported by this server: it decodes speculatively (--draft "
                                   f"{spec.draft.kind}), whose verify step scores the model's raw distribution, so "
                                   f"{name} would not change the output exactly; drop {name}", name,
                                   code="unsupported_with_draft")
        room = spec.draft.config.n_positions if isinstance(spec.draft, ModelDraft) else None
        if room is not None and len(r.prompts[0]) + r.max_new_tokens > room:
            raise RequestError(400, f"prompt length {len(r.prompts[0])} + max_tokens {r.max_new_tokens} exceeds the "
                               f"draft model's context ({room} tokens) of this speculative server", "max_tokens")


def _server_span(request: Request) -> Any:
    """The request's span: a SERVER span continuing the W3C traceparent of the request, or, where FastAPI's own
    telemetry already opened that span (FastAPI >= 0.16x with an SDK), a child of it."""
    attributes = {"http.request.method": "POST", "http.route": "/v1/completions"}
    if trace.get_current_span().get_span_context().is_valid:
        return tracer().start_span("gptjax.serve.completion", attributes=attributes)
    parent = TraceContextTextMapPropagator().extract(dict(request.headers))
    return tracer().start_span("POST /v1/completions", context=parent, kind=trace.SpanKind.SERVER,
                               attributes=attributes)


def _end(span: Any, status: int) -> None:
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(trace.Status(trace.StatusCode.ERROR))
    span.end()


def _submit(state: ServerState, jobs: list[Job]) -> None:
    if not jobs:  # echo only: nothing to generate
        return
    try:
        state.scheduler.submit_all(jobs)
    except QueueFull as e:
        raise RequestError(429, f"{e}; retry later", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
    except ShuttingDown as e:
        raise RequestError(503, str(e), type="server_error", code="unavailable") from None


DISCONNECT_CHECK_S = 0.5  # how often a waiting request asks whether its client is still there


async def _next_event(request: Request | None, job: Job | _Jobs, deadline: float,
                      checked: list[float] | None = None) -> Event:
    """The job's next event; on the deadline cancel it (504); a vanished client cancels it too. The client is
    asked at least every DISCONNECT_CHECK_S, also while events keep coming (`checked` holds the last time)."""
    loop = asyncio.get_running_loop()
    checked = checked if checked is not None else [loop.time()]
    while True:
        now = loop.time()
        remaining = deadline - now
        if remaining <= 0:
            job.cancel("timeout")
            raise RequestError(504, "the request timed out; its work was cancelled", type="timeout_error",
                               code="timeout")
        if request is not None and now - checked[0] >= DISCONNECT_CHECK_S:
            checked[0] = now
            if await request.is_disconnected():
                job.cancel("disconnect")
                raise RequestError(499, "the client closed the connection")
        try:
            return await asyncio.wait_for(job.events.get(), min(remaining, DISCONNECT_CHECK_S))
        except TimeoutError:
            continue


def _generation_error(error: BaseException) -> RequestError:
    """A job's failure as what the client may see (the details stay in the server log)."""
    if isinstance(error, ShuttingDown):
        return RequestError(503, str(error), type="server_error", code="unavailable")
    if isinstance(error, GptjaxError):  # a request the checks let through but the backend refused
        return RequestError(400, str(error))
    log.error("generation failed", exc_info=error)
    return RequestError(500, f"generation failed ({type(error).__name__}); the request was not completed",
                        type="server_error")


class _Jobs:
    """A request's jobs (one per choice) sharing one event queue; cancel() cancels them all."""

    def __init__(self, completion: Completion, loop: asyncio.AbstractEventLoop, span: Any, client: str) -> None:
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.jobs = [Job(r, loop, span, index=c, events=self.events, client=client)
                     for c, r in enumerate(completion.requests)]

    def cancel(self, reason: str) -> None:
        """Stop working for every choice still running."""
        for job in self.jobs:
            job.cancel(reason)


def _choices(completion: Completion, text: TokenText) -> list[Choice]:
    """The response's choices in order (choice p * n + j is prompt p's j-th sample); with max_tokens 0 each is
    finished already (echo only)."""
    choices = [Choice(c, completion.prompts[c // completion.n], completion.stops, text, completion.echo)
               for c in range(completion.choices)]
    if not completion.requests:
        for choice in choices:
            choice.finish = "length"
    return choices


def _apply(event: Event, choices: list[Choice], jobs: _Jobs) -> str:
    """An event's tokens into its choice; the new text. A stop string found stops that row's generation."""
    choice = choices[event.index]
    delta = choice.add(event.tokens, event.finish_reason)
    if choice.finish == "stop" and event.finish_reason is None:
        jobs.jobs[event.index].cancel(STOPPED)
    return delta


async def _score(state: ServerState, choices: list[Choice], keep: bool) -> list[Scores]:
    """Each choice's Scores up to its current sequence, in a thread, each between two of the worker's chunks. A
    choice scores through a GrowingScores of its own (Backend.open_scorer), so only positions not scored before
    are computed; keep: hold it for the next call (a stream), else let it go (and its KV cache) once scored."""
    def run() -> list[Scores]:
        out = []
        for choice in choices:
            with state.scheduler.device:
                if choice.scorer is None:  # the server's top_k: one program whatever logprobs asks (a prefix)
                    choice.scorer = state.model.backend.open_scorer(state.model.weights, top_k=MAX_LOGPROBS)
                sequence = choice.sequence()
                out.append(choice.scorer.extend(sequence[len(choice.scorer.tokens):]))
            if not keep:
                choice.scorer = None
        return out
    try:
        return await asyncio.to_thread(run)
    except Exception as e:
        raise _generation_error(e) from None


def _block(choice: Choice, scores: Any, first: int, k: int, text: TokenText) -> dict[str, Any]:
    """The logprobs object of the choice's tokens from sequence position `first` on (the echoed prompt's from
    0), continuing the choice's text offsets."""
    block = logprobs_block(scores, range(first, len(choice.sequence())), k, text, choice.offset)
    if block["tokens"]:
        choice.offset = block["text_offset"][-1] + len(block["tokens"][-1])
    return block


# ---- one JSON body ------------------------------------------------------------------------------------------
async def _collect(request: Request, state: ServerState, jobs: _Jobs, completion: Completion,
                   head: dict[str, Any]) -> Response:
    """The whole completion as one JSON body."""
    loop = asyncio.get_running_loop()
    deadline, checked = loop.time() + state.options.request_timeout, [loop.time()]
    text = TokenText(state.model.tokenizer)
    choices = _choices(completion, text)
    while any(c.finish is None for c in choices):
        event = await _next_event(request, jobs, deadline, checked)
        if event.error is not None:
            raise _generation_error(event.error)
        if choices[event.index].finish is None:
            _apply(event, choices, jobs)
    blocks = await _blocks(state, completion, choices, text)
    out = [{"text": (text.decode(c.prompt) if completion.echo else "") + c.stop.text, "index": c.index,
            "logprobs": block, "finish_reason": c.finish, "token_ids": c.tokens} for c, block in zip(choices, blocks)]
    used = usage(completion.prompts, choices)
    request.scope.setdefault(ACCESS, {})["tokens"] = used["completion_tokens"]
    return JSONResponse(head | {"choices": out, "usage": used})


async def _blocks(state: ServerState, completion: Completion, choices: list[Choice], text: TokenText) -> list[Any]:
    """Each finished choice's logprobs object (None without logprobs), from one scoring call."""
    k = completion.logprobs
    if k is None:
        return [None] * len(choices)
    scores = await _score(state, choices, keep=False)
    return [_block(c, s, 0 if completion.echo else len(c.prompt), k, text) for c, s in zip(choices, scores)]


# ---- Server-Sent Events -------------------------------------------------------------------------------------
async def _sse(state: ServerState, jobs: _Jobs, completion: Completion, head: dict[str, Any], span: Any,
               access: dict[str, Any]) -> AsyncIterator[str]:
    """Server-Sent Events in OpenAI's chunk format, ending with `data: [DONE]` (access gets the token count).
    With logprobs, all events already waiting are answered together, so one scoring call covers them."""
    deadline = asyncio.get_running_loop().time() + state.options.request_timeout
    text = TokenText(state.model.tokenizer)
    choices, status = _choices(completion, text), 200
    try:
        if not completion.requests:  # echo only: each choice's prompt, once
            for chunk in await _stream_chunks(state, completion, choices, dict.fromkeys(range(len(choices)), ""), text):
                yield _data(head | {"choices": [chunk]})
        while any(c.finish is None for c in choices):
            events, failure = await _events(jobs, deadline, completion.logprobs is not None)
            if failure is not None:
                status = failure.status
                yield _data(failure.body())
                break
            for chunk in await _stream_chunks(state, completion, choices, _deltas(events, choices, jobs), text):
                yield _data(head | {"choices": [chunk]})
        else:
            if completion.include_usage:
                yield _data(head | {"choices": [], "usage": usage(completion.prompts, choices)})
        yield "data: [DONE]\n\n"
    finally:
        _stream_ended(state, jobs, choices, span, access, status)


def _stream_ended(state: ServerState, jobs: _Jobs, choices: list[Choice], span: Any, access: dict[str, Any],
                  status: int) -> None:
    """A stream ended (answered, failed, or its client left): cancel what still runs, count and close."""
    jobs.cancel("disconnect" if status == 200 else "error")  # a no-op unless the client left or one failed
    access["tokens"] = sum(len(c.tokens) for c in choices)
    span.set_attribute("gptjax.stream", True)
    _end(span, status)
    state.inflight -= 1


async def _events(jobs: _Jobs, deadline: float, all_waiting: bool) -> tuple[list[Event], RequestError | None]:
    """The next event (and with all_waiting every event already queued), or what to tell the client instead:
    the timeout, or the first job's error."""
    try:
        events = [await _next_event(None, jobs, deadline)]
    except RequestError as e:
        return [], e
    while all_waiting and not jobs.events.empty():
        events.append(jobs.events.get_nowait())
    error = next((e.error for e in events if e.error is not None), None)
    return events, None if error is None else _generation_error(error)


def _deltas(events: list[Event], choices: list[Choice], jobs: _Jobs) -> dict[int, str]:
    """The events' tokens into their choices; the new text per changed choice."""
    deltas: dict[int, str] = {}
    for event in events:
        if choices[event.index].finish is None:  # a stopped row's last tokens are dropped
            deltas[event.index] = deltas.get(event.index, "") + _apply(event, choices, jobs)
    return deltas


async def _stream_chunks(state: ServerState, completion: Completion, choices: list[Choice], deltas: dict[int, str],
                         text: TokenText) -> list[dict[str, Any]]:
    """One chunk choice per changed choice (the keys of deltas, its new text): its new text (after the echoed
    prompt in its first chunk), its new tokens, their log-probabilities when asked (one scoring call for all), its
    finish reason once known."""
    order = sorted(deltas)
    firsts = {c: (0 if completion.echo and not choices[c].started else
                  len(choices[c].prompt) + choices[c].sent_tokens) for c in order}
    scores = await _new_scores(state, completion, choices, firsts)
    return [_chunk_choice(completion, choices[c], firsts[c], scores.get(c), deltas.get(c, ""), text) for c in order]


async def _new_scores(state: ServerState, completion: Completion, choices: list[Choice], firsts: dict[int, int]
                      ) -> dict[int, Any]:
    """The scores of the choices in `firsts` that have tokens from their first unreported position on (one
    scoring call), when logprobs are asked for."""
    wanted = [c for c, first in firsts.items() if first < len(choices[c].sequence())]
    if completion.logprobs is None or not wanted:
        return {}
    scored = await _score(state, [choices[c] for c in wanted], keep=True)
    return dict(zip(wanted, scored))


def _chunk_choice(completion: Completion, choice: Choice, first: int, scores: Any, delta: str, text: TokenText
                  ) -> dict[str, Any]:
    """A chunk's entry for one choice, which then counts as reported up to here."""
    new = choice.tokens[choice.sent_tokens:]
    prefix = text.decode(choice.prompt) if completion.echo and not choice.started else ""
    block = None
    if completion.logprobs is not None:
        block = (_block(choice, scores, first, completion.logprobs, text) if scores is not None else
                 {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []})
    choice.started, choice.sent_tokens = True, len(choice.tokens)
    return {"text": prefix + delta, "index": choice.index, "logprobs": block, "finish_reason": choice.finish,
            "token_ids": new}


def _data(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"
