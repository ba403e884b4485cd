"""From a validated request to engine outputs: prompt checks, submission, streaming, disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import Request

from qmodel_runtime.engine import EngineDraining, QueueFull, RequestOutput, SamplingParams
from qmodel_runtime.serve.errors import APIError
from qmodel_runtime.serve.protocol import new_id
from qmodel_runtime.serve.startup import ServerState

log = logging.getLogger(__name__)
RETRY_AFTER_SECONDS = 1


def check_serving(state: ServerState, model: str) -> None:
    if state.engine is not None and state.engine.draining:
        state.metrics.reject("draining")
        raise APIError(503, "the server is shutting down; retry on another replica", code="shutting_down")
    if not state.ready:
        detail = f": {state.reason}" if state.reason else ""
        raise APIError(503, f"the model is not ready ({state.status}{detail})", code="not_ready")
    if model != state.model_name:
        raise APIError(
            404,
            f"the model {model!r} does not exist; this server serves {state.model_name!r}",
            param="model",
            code="model_not_found",
        )


def check_prompt(state: ServerState, prompt_ids: list[int]) -> None:
    if not prompt_ids:
        raise APIError(400, "the prompt is empty after tokenization; send at least one token", param="prompt")
    bad = next((t for t in prompt_ids if not 0 <= t < state.vocab_size), None)
    if bad is not None:
        raise APIError(
            400, f"prompt token id {bad} is outside the vocabulary [0, {state.vocab_size})", param="prompt"
        )
    if len(prompt_ids) >= state.max_len:
        raise APIError(
            400,
            f"the prompt is {len(prompt_ids)} tokens; this model's context is {state.max_len} "
            f"tokens, which must also hold at least one generated token; shorten the prompt",
            param="prompt",
            code="context_length_exceeded",
        )


def resolve_max_tokens(state: ServerState, prompt_len: int, requested: int | None, param: str) -> int:
    """The OpenAI rule: prompt + max_tokens must fit the context; unset means 'the rest of it'."""
    room = state.max_len - prompt_len
    if requested is None:
        return room
    if requested > room:
        raise APIError(
            400,
            f"{param} is {requested} but the prompt is {prompt_len} tokens and this model's "
            f"context is {state.max_len} tokens: at most {room} tokens can be generated; "
            f"lower {param} or shorten the prompt",
            param=param,
            code="context_length_exceeded",
        )
    return requested


def check_stop_tokens(state: ServerState, params: SamplingParams) -> None:
    bad = [t for t in params.stop_token_ids if t >= state.vocab_size]
    if bad:
        raise APIError(
            400,
            f"stop_token_ids {bad} are outside the vocabulary [0, {state.vocab_size})",
            param="stop_token_ids",
        )


class Submission:
    """One request in the engine, its outputs delivered into an asyncio queue."""

    def __init__(self, state: ServerState, prompt_ids: list[int], params: SamplingParams, prefix: str):
        self.state, self.id = state, new_id(prefix)
        self.prompt_tokens = len(prompt_ids)
        self.queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.finished = False
        loop = asyncio.get_running_loop()

        def emit(out: RequestOutput) -> None:  # runs on the engine thread
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
                loop.call_soon_threadsafe(self.queue.put_nowait, out)

        try:
            state.engine.submit(self.id, prompt_ids, params, emit)
        except QueueFull as exc:
            state.metrics.reject("queue_full")
            raise APIError(
                429,
                f"the server is at capacity: {exc}; retry after {RETRY_AFTER_SECONDS} s",
                code="queue_full",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            ) from exc
        except EngineDraining as exc:
            state.metrics.reject("draining")
            raise APIError(503, str(exc), code="shutting_down") from exc

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """Every output until the finished one; aborts the request if the consumer stops early
        (client disconnected: the generator is closed or cancelled)."""
        try:
            while not self.finished:
                out = await self.queue.get()
                self.finished = out.finished
                yield out
        finally:
            if not self.finished:
                self.state.engine.abort(self.id)
                log.info("request %s aborted: client gone", self.id)


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(sub: Submission, request: Request) -> tuple[str, RequestOutput]:
    """All text of a non-streaming request; aborts it when the client disconnects first."""
    watcher = asyncio.ensure_future(_disconnected(request))
    parts: list[str] = []
    outputs = sub.outputs()
    try:
        while True:
            nxt = asyncio.ensure_future(anext(outputs))
            await asyncio.wait({nxt, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not nxt.done():  # the client left
                nxt.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await nxt
                raise APIError(499, "client disconnected")
            out = nxt.result()
            parts.append(out.text)
            if out.finished:
                return "".join(parts), out
    finally:
        watcher.cancel()
        await outputs.aclose()


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


SSE_DONE = sse("[DONE]")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
