"""Request and response bodies of the agent service.

Requests are pydantic models that refuse unknown fields (OpenAI answers 400 "Unrecognized request
argument"), bound every list and string, and refuse text that is not valid Unicode (a lone
surrogate would otherwise fail deep inside the tokenizer). Responses use the ``openai`` package's
own types, so the shapes are the ones its clients parse.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kvcomm.protocol import MaskMode
from kvcomm.protocol.blend import Deviation
from kvcomm.tasks.base import Pieces
from kvcomm.wire.codecs.auto import MAX_BANDWIDTH_MBIT, MIN_BANDWIDTH_MBIT

MAX_TEXT = 4 << 20  # characters in one message or context


def _unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text is not valid Unicode (a lone surrogate)") from None
    return text


Text = Annotated[str, Field(max_length=MAX_TEXT)]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    """One turn. ``tool`` and ``function`` roles are recognised so they can be refused clearly."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Text | Annotated[list[TextPart], Field(max_length=256)]
    name: Annotated[str, Field(max_length=256)] | None = None

    @field_validator("content")
    @classmethod
    def _valid_text(cls, content: str | list[TextPart]) -> str | list[TextPart]:
        for text in [content] if isinstance(content, str) else [p.text for p in content]:
            _unicode(text)
        return content

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def turn(self) -> dict[str, str]:
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text}


class InlineMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: Annotated[str, Field(description="A KV message, base64-encoded.")]


MessageRef = Annotated[str, Field(max_length=128)] | InlineMessage


class BlendRequest(BaseModel):
    """Blend the KV messages (CacheBlend): recompute this fraction of their tokens, chosen by KV
    deviation at the check layer, so that pieces prefilled apart attend to each other."""

    model_config = ConfigDict(extra="forbid")
    ratio: Annotated[float, Field(ge=0, le=1)] = 0.15
    check_layer: Annotated[int, Field(ge=1, le=4096)] = 1
    deviation: Deviation = "values"


class KVReturn(BaseModel):
    """Store this completion's turn as a KV message and return its id (``kv_message`` in the
    response): the reply tokens' KV (``reply``) or the prompt's and the reply's (``turn``), at
    ``layers`` (all if left out; the sink elsewhere), encoded with ``codec``. Another agent then
    hears the reply as KV by naming the id in its ``kv_messages``."""

    model_config = ConfigDict(extra="forbid")
    content: Literal["reply", "turn"] = "reply"
    layers: Annotated[list[int], Field(min_length=1, max_length=4096)] | None = None
    codec: Annotated[str, Field(max_length=64)] = "fp16"


class ChatRequest(BaseModel):
    """An OpenAI chat completion request, plus ``kv_messages`` (stored ids or inline messages)."""

    model_config = ConfigDict(extra="forbid")
    model: Annotated[str, Field(max_length=256)] | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=4096)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    stream: bool = False
    # checked by the service, so that a malformed value is a 400 that names it (as OpenAI's)
    stream_options: Any = Field(default=None, description=(
        'with stream: {"include_usage": true} sends the usage as one last chunk with no choices (OpenAI\'s); '
        "include_obfuscation is accepted and ignored"))
    kv_messages: Annotated[list[MessageRef], Field(max_length=4096)] = Field(default_factory=list)
    kv_blend: BlendRequest | None = None
    kv_return: KVReturn | None = None
    # accepted so that they can be refused with a reason (only greedy decoding exists)
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    stop: str | list[str] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    seed: int | None = None  # greedy decoding is deterministic: any seed gives the same answer
    user: Annotated[str, Field(max_length=256)] | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """``(parameter, reason)`` of the first parameter this service cannot honour, if any."""
        checks: list[tuple[str, bool, str]] = [
            ("n", self.n not in (None, 1), "only n=1 is supported"),
            ("temperature", self.temperature not in (None, 0, 0.0),
             "only greedy decoding is supported: leave temperature out or set it to 0"),
            ("top_p", self.top_p not in (None, 1, 1.0), "only greedy decoding is supported: top_p must be 1"),
            ("presence_penalty", bool(self.presence_penalty), "penalties are not supported"),
            ("frequency_penalty", bool(self.frequency_penalty), "penalties are not supported"),
            ("logprobs", bool(self.logprobs) or self.top_logprobs is not None, "logprobs are not supported"),
            ("stop", self.stop not in (None, [], ""), "stop sequences are not supported"),
            ("tools", bool(self.tools) or self.tool_choice not in (None, "none"), "tools are not supported"),
            ("functions", bool(self.functions) or self.function_call is not None, "functions are not supported"),
            ("response_format", self.response_format not in (None, {"type": "text"}),
             "only text responses are supported"),
        ]
        checks.append(("kv_blend", self.kv_blend is not None and not self.kv_messages,
                       "kv_blend recomputes tokens of kv_messages: send some, or leave kv_blend out"))
        checks += [("messages", m.role in ("tool", "function"), f"the {m.role!r} role is not supported")
                   for m in self.messages]
        return next(((name, reason) for name, bad, reason in checks if bad), None)


class ProfileDetails(BaseModel):
    """The part of a profile's ``details`` the service reads: the layout it was calibrated on."""

    model_config = ConfigDict(extra="ignore")
    pieces: Pieces = "chats"


class ProfileBody(BaseModel):
    """A layer ranking: the ``ranking`` of a ``kvcomm calibrate`` profile, and optionally its
    ``details``. A profile with ``details`` was calibrated on items read as ``details.pieces``
    (``chats`` when absent) and is refused for the other layout; a bare ranking claims none.
    Other fields are ignored."""

    model_config = ConfigDict(extra="ignore")
    ranking: Annotated[list[int], Field(min_length=1, max_length=4096)]
    details: ProfileDetails | None = None


class ContextRequest(BaseModel):
    """Prefill a context and store its KV message (at ``layers``, or the top ``ratio`` of a ranking)."""

    model_config = ConfigDict(extra="forbid")
    context: Text | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=4096)] | None = None
    layers: Annotated[list[int], Field(min_length=1, max_length=4096)] | None = None
    ratio: Annotated[float, Field(gt=0, le=1)] | None = None
    profile: ProfileBody | None = None
    codec: Annotated[str, Field(max_length=64)] | None = None
    bandwidth_mbit: Annotated[float, Field(ge=MIN_BANDWIDTH_MBIT, le=MAX_BANDWIDTH_MBIT, description=(
        "with codec 'auto': the link's bandwidth (Mbit/s) the codec is chosen for (default 100)"))] | None = None
    bandwidth_measured: bool = Field(default=False, description=(
        "the bandwidth was measured on this link (kvcomm.Client times the messages it fetches), not assumed"))
    receiver_compute_s: Annotated[float, Field(ge=0, le=3600, strict=True, description=(
        "with codec 'auto', for a receiver that prefills while the layers arrive (kvcomm.Client.arriving): the "
        "seconds of that prefill, on the CPU that also decodes, so decoding competes with it (default 0; rounded "
        "to two significant figures)"))] | None = None
    mode: MaskMode | None = None
    id: Annotated[str, Field(max_length=128)] | None = None
    passage: bool = Field(default=False, description=(
        "store 'context' as a passage: read by a chat at the start of its last user turn, joined with other "
        "passages in any order (kv_blend restores their attention to each other); prefilled behind the chat's "
        "opening, which is dropped, and read as one line"))

    @field_validator("context")
    @classmethod
    def _valid_text(cls, context: str | None) -> str | None:
        return None if context is None else _unicode(context)

    @model_validator(mode="after")
    def _one_source(self) -> ContextRequest:
        if (self.context is None) == (self.messages is None):
            raise ValueError("give exactly one of 'context' or 'messages'")
        if self.layers is not None and (self.ratio is not None or self.profile is not None):
            raise ValueError("give 'layers', or a 'ratio' (with an optional 'profile'), not both")
        if self.bandwidth_measured and self.bandwidth_mbit is None:
            raise ValueError("'bandwidth_measured' describes a 'bandwidth_mbit': give one")
        if self.passage and self.context is None:
            raise ValueError("a passage is a 'context' text, not 'messages'")
        return self


class ContextCreated(BaseModel):
    id: str
    bytes: int
    cached: bool = Field(description="True when this content was stored already (no prefill was spent)")
    fingerprint: dict[str, Any]
    context_tokens: int
    layers: list[int]
    codec: str = Field(description="the codec's name as a request gives it (int8, klt …; auto's choice), or its "
                                   "class where no such name is it")
    mode: str
    codec_choice: dict[str, Any] | None = Field(
        default=None, description="with codec 'auto': the codec chosen and why (each candidate's estimates)")
    bandwidth_mbit: float | None = Field(default=None, description="with codec 'auto': the bandwidth chosen for")
    bandwidth_source: Literal["declared", "measured", "default"] | None = Field(
        default=None, description="with codec 'auto': where that bandwidth came from (given by the request, "
                                  "measured by the requesting client on this link, or the default)")


class MessageStored(BaseModel):
    id: str
    bytes: int
    layers: list[int]


class Deleted(BaseModel):
    id: str
    deleted: bool


class Health(BaseModel):
    """``/healthz``: with a token set, a caller without it sees the status and the store's kind only."""

    status: Literal["ok", "degraded"]
    model: str | None = None
    layers: int | None = None
    store: dict[str, Any]
