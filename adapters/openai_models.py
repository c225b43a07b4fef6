"""Request bodies of the OpenAI routes: OpenAI's fields plus vLLM's sampling extensions, as pydantic models
so that the app's OpenAPI schema describes them. Unknown fields are refused (OpenAI does the same), so a
misspelt parameter is reported instead of ignored. Ranges are checked once, by SamplingParams."""
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kvserve.adapters.params import SamplingFields


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Sampling(SamplingFields):
    """The sampling fields every protocol shares (params.SAMPLING_PARAMS) plus OpenAI's own."""
    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="a served model name; default: the served model")
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = Field(None, description="not supported: must be empty")
    user: str | None = None
    timeout: float | None = Field(None, description="seconds until the request is aborted (504); "
                                  "default and upper bound: the server's --request-timeout")


class CompletionRequest(_Sampling):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "example": {"model": "kvserve-tiny", "prompt": "The lighthouse keeper", "max_tokens": 16}})
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = Field(None, description="not supported")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # templates may read fields of their own (name, tool_calls...)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None


class ChatCompletionRequest(_Sampling):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "example": {"model": "kvserve-tiny", "messages": [{"role": "user", "content": "Hello"}],
                    "max_completion_tokens": 16}})
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = Field(None, description='only {"type": "text"}')
    tools: list[dict[str, Any]] | None = Field(None, description="not supported: must be empty")
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
