"""The HTTP surface: OpenAI-compatible endpoints, health, metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from qmodel_runtime.serve import errors
from qmodel_runtime.serve.errors import APIError
from qmodel_runtime.serve.generation import (
    SSE_DONE,
    SSE_HEADERS,
    Submission,
    check_prompt,
    check_serving,
    check_stop_tokens,
    collect,
    resolve_max_tokens,
    sse,
)
from qmodel_runtime.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ErrorResponse,
    ModelCard,
    ModelList,
    UsageInfo,
)
from qmodel_runtime.serve.startup import ServerState

ERROR_RESPONSES = {code: {"model": ErrorResponse} for code in (400, 404, 429, 503)}


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(
        title="qmodel runtime",
        version="0.1.0",
        description="OpenAI-compatible server for a GPTQ int4 model packed by qmodel.",
    )
    app.state.qmodel = state
    errors.install(app)

    @app.get("/health/live")
    async def live() -> dict:
        return {"status": "alive"}

    @app.get("/health/ready", responses={503: {"description": "loading, failed or shutting down"}})
    async def ready():
        engine, status, reason = state.engine, state.status, state.reason or None
        if engine is not None and engine.error is not None:
            status, reason = "failed", f"the engine stopped: {engine.error}"
        elif engine is not None and engine.draining:
            status = "draining"
        body = {"status": status, "model": state.model_name, "reason": reason}
        if state.memory is not None:
            body["capacity"] = {
                "kv_cache_tokens": state.memory.kv_cache_tokens,
                "max_batch": state.memory.max_batch,
                "max_model_len": state.memory.max_model_len,
            }
        return JSONResponse(body, status_code=200 if status == "ready" and state.ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=state.model_name, max_model_len=state.max_len)])

    @app.post("/v1/completions", response_model=CompletionResponse, responses=ERROR_RESPONSES)
    async def completions(body: CompletionRequest, request: Request):
        check_serving(state, body.model)
        body.check_supported()
        prompt_ids = _completion_prompt(state, body)
        sub = _submit(state, body, prompt_ids, body.max_tokens, "max_tokens", "cmpl")
        if body.stream:
            return _sse(_completion_stream(sub, state.model_name, _include_usage(body)))
        text, last = await collect(sub, request)
        return CompletionResponse(
            id=sub.id,
            model=state.model_name,
            choices=[CompletionChoice(text=text, finish_reason=last.finish_reason)],
            usage=UsageInfo.of(last.prompt_tokens, last.completion_tokens),
        )

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERROR_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_serving(state, body.model)
        body.check_supported()
        prompt_ids = _chat_prompt(state, body)
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        sub = _submit(state, body, prompt_ids, body.requested_max_tokens, param, "chatcmpl")
        if body.stream:
            return _sse(_chat_stream(sub, state.model_name, _include_usage(body)))
        text, last = await collect(sub, request)
        return ChatCompletionResponse(
            id=sub.id,
            model=state.model_name,
            choices=[ChatChoice(message=AssistantMessage(content=text), finish_reason=last.finish_reason)],
            usage=UsageInfo.of(last.prompt_tokens, last.completion_tokens),
        )

    return app


def _submit(
    state: ServerState, body, prompt_ids: list[int], max_tokens: int | None, param: str, prefix: str
) -> Submission:
    """The checks both endpoints share, then the request into the engine."""
    check_prompt(state, prompt_ids)
    params = body.sampling_params(resolve_max_tokens(state, len(prompt_ids), max_tokens, param))
    check_stop_tokens(state, params)
    return Submission(state, prompt_ids, params, prefix)


def _include_usage(body) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)


def _completion_prompt(state: ServerState, body: CompletionRequest) -> list[int]:
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        return list(prompt)
    text = prompt[0] if isinstance(prompt, list) else prompt
    return _tokenize(state, text, add_special_tokens=True)


def _tokenize(state: ServerState, text: str, add_special_tokens: bool) -> list[int]:
    try:
        return state.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    except Exception as exc:  # the Rust tokenizer refuses e.g. lone UTF-16 surrogates from JSON escapes
        raise APIError(400, f"the prompt cannot be tokenized: {exc}", param="prompt") from exc


def _chat_prompt(state: ServerState, body: ChatCompletionRequest) -> list[int]:
    tok = state.tokenizer
    if not getattr(tok, "chat_template", None):
        raise APIError(
            400, "this model has no chat template; use /v1/completions with a plain prompt", param="messages"
        )
    try:
        text = tok.apply_chat_template(body.conversation(), add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # jinja raises whatever the template author chose (TemplateError, ValueError...)
        raise APIError(
            400, f"the model's chat template rejected these messages: {exc}", param="messages"
        ) from exc
    return _tokenize(state, text, add_special_tokens=False)


async def _completion_stream(sub: Submission, model: str, include_usage: bool) -> AsyncIterator[str]:
    last = None
    async for out in sub.outputs():
        last = out
        if out.text or out.finished:
            chunk = CompletionResponse(
                id=sub.id,
                model=model,
                choices=[CompletionChoice(text=out.text, finish_reason=out.finish_reason)],
            )
            yield sse(chunk.model_dump_json(exclude_none=True))
    if include_usage and last is not None:
        chunk = CompletionResponse(
            id=sub.id, model=model, choices=[], usage=UsageInfo.of(last.prompt_tokens, last.completion_tokens)
        )
        yield sse(chunk.model_dump_json())
    yield SSE_DONE


async def _chat_stream(sub: Submission, model: str, include_usage: bool) -> AsyncIterator[str]:
    def chunk(delta: DeltaMessage, finish: str | None = None) -> str:
        c = ChatCompletionChunk(
            id=sub.id, model=model, choices=[ChatChunkChoice(delta=delta, finish_reason=finish)]
        )
        return sse(c.model_dump_json(exclude_none=True))

    yield chunk(DeltaMessage(role="assistant", content=""))
    last = None
    async for out in sub.outputs():
        last = out
        if out.text:
            yield chunk(DeltaMessage(content=out.text))
        if out.finished:
            yield chunk(DeltaMessage(), out.finish_reason)
    if include_usage and last is not None:
        usage = ChatCompletionChunk(
            id=sub.id, model=model, choices=[], usage=UsageInfo.of(last.prompt_tokens, last.completion_tokens)
        )
        yield sse(usage.model_dump_json())
    yield SSE_DONE
