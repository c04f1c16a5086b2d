"""OpenAI's request and response shapes (chat completions, completions, models, errors) and vLLM's adapter-loading
requests, as pydantic models and plain builders.

Requests are strict: a field lorakit does not know is a 400 naming it (`extra="forbid"`), and an OpenAI field it
knows but does not implement is accepted only at its neutral value (`n: 1`, `logprobs: false`, penalties 0, ...),
so nothing a client asks for is silently ignored. Beyond OpenAI's fields: vLLM's `top_k`, `repetition_penalty`
and `ignore_eos`, and lorakit's `adapters` (a weighted combination {name: weight} for one request).
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with `status`."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code or {400: "invalid_value", 401: "invalid_api_key", 404: "not_found", 413: "body_too_large",
                             429: "queue_full", 500: "internal_error", 503: "shutting_down"}.get(status, "error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


NEUTRAL = {  # OpenAI fields lorakit does not implement: accepted only at these values
    "n": (1,), "logprobs": (False, None), "top_logprobs": (None, 0), "presence_penalty": (0, None),
    "frequency_penalty": (0, None), "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none"),
    "functions": (None, []), "function_call": (None, "none"), "response_format": (None, {"type": "text"}),
    "parallel_tool_calls": (None, False), "echo": (False, None), "best_of": (1, None), "suffix": (None, ""),
}


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(Strict):
    include_usage: bool = False


class GenerationFields(Strict):
    """The fields chat completions and completions share."""

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0
    repetition_penalty: Annotated[float, Field(gt=0)] = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    adapters: dict[str, float] | None = None
    user: str | None = None  # an end-user id for the caller's own records; it changes nothing
    # accepted at their neutral value only (see NEUTRAL)
    n: Any = 1
    logprobs: Any = None
    top_logprobs: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None
    best_of: Any = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        if len(stops) > 16:
            raise ValueError("at most 16 stop strings")
        return stops

    @model_validator(mode="after")
    def _neutral(self):
        for name in self.model_fields_set & set(NEUTRAL):
            if getattr(self, name) not in NEUTRAL[name]:
                raise ApiError(400, f"{name}={getattr(self, name)!r} is not supported by lorakit serve "
                                    f"(accepted: {NEUTRAL[name][0]!r})", param=name, code="unsupported_value")
        if self.max_tokens and self.max_completion_tokens and self.max_tokens != self.max_completion_tokens:
            raise ApiError(400, "max_tokens and max_completion_tokens differ; give one", param="max_tokens")
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options needs stream: true", param="stream_options")
        return self

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(GenerationFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    parallel_tool_calls: Any = None

    def conversation(self) -> list[dict]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(GenerationFields):
    prompt: str | Annotated[list[int], Field(min_length=1)] | Annotated[list[str], Field(min_length=1, max_length=1)]
    echo: Any = None
    suffix: Any = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, str) and not value:
            raise ValueError("prompt must not be empty")
        if isinstance(value, list) and value and isinstance(value[0], str):
            return value[0]  # a list holding one prompt
        return value


class LoadAdapterRequest(Strict):
    lora_name: Annotated[str, Field(min_length=1, max_length=200)]
    lora_path: Annotated[str, Field(min_length=1)]


class UnloadAdapterRequest(Strict):
    lora_name: Annotated[str, Field(min_length=1)]
    lora_int_id: int | None = None  # vLLM's optional id; lorakit names adapters only


# --- responses --------------------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(request_id: str, model: str, text: str, finish: str, prompt_tokens: int, completion: int) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}],
            "usage": usage(prompt_tokens, completion)}


def chat_chunk(request_id: str, model: str, delta: dict, finish: str | None = None, with_usage: bool = False) -> dict:
    chunk = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
             "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    if with_usage:
        chunk["usage"] = None
    return chunk


def completion_response(request_id: str, model: str, text: str, finish: str, prompt_tokens: int,
                        completion: int) -> dict:
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            "usage": usage(prompt_tokens, completion)}


def completion_chunk(request_id: str, model: str, text: str, finish: str | None = None,
                     with_usage: bool = False) -> dict:
    chunk = {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
             "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
    if with_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(request_id: str, model: str, kind: str, prompt_tokens: int, completion: int) -> dict:
    """The last chunk with stream_options.include_usage: no choices, the usage."""
    return {"id": request_id, "object": kind, "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion)}
