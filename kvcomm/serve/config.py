"""What one agent service allows and defaults to (``kvcomm serve`` options), checked where it is made."""

from __future__ import annotations

from typing import Self

from pydantic import Field, field_validator, model_validator

from kvcomm.config import Options
from kvcomm.protocol import MaskMode
from kvcomm.selection.calibrate import DEFAULT_RULE, Rule
from kvcomm.wire.codecs import CodecName

MIB = 1 << 20


class ServeConfig(Options):
    """Limits and defaults of one agent service.

    Attributes:
        token: when set, every ``/v1`` route (and ``/metrics``, ``/docs``, ``/openapi.json`` unless
            ``public_docs``) needs ``Authorization: Bearer <token>``.
        served_model_names: the names clients may use in ``model`` (vLLM's ``--served-model-name``);
            ``/v1/models`` lists every one; the first names the model in responses to requests
            that give none. Empty: the model's own name.
        max_request_bytes: largest request body, with or without a ``Content-Length``.
        max_message_bytes: largest KV message stored, uploaded or used.
        max_decoded_bytes: most float32 bytes the KV messages of one request may decode to.
        max_decoded_total_bytes: most float32 bytes the KV messages of all requests in flight
            (decoded, waiting for the model or answering) may decode to together; one more is
            refused (503, ``decoded_budget_busy``, ``Retry-After``) before it decodes anything.
            None: 4 × ``max_decoded_bytes``.
        max_kv_messages: most KV messages one chat request may use.
        max_new_tokens: largest answer budget a request may ask for; ``default_max_tokens`` if it asks
            none, shrunk to the model's positions left after the KV and the prompt (a budget asked for
            that does not fit is refused: 400, ``context_length_exceeded``).
        timeout_s: per-request deadline, from the request's arrival: fetching and decoding its KV
            messages, waiting for the model, prefill and generation; an upload's whole body must
            arrive within it too.
        max_uploads: most uploads (``PUT /v1/messages/{id}``) received at once; one more is refused
            (503, ``too_many_uploads``) until one ends. Each is checked on a thread of its own, so
            uploads never take the threads the other routes (chat included) run on.
        upload_idle_s: an upload that sends no byte for this many seconds is refused (408,
            ``upload_timeout``) and its connection closed; nothing of it is stored.
        prefill_chunk: prompts are prefilled this many tokens at a time, so deadlines and
            disconnects are noticed during long prefills too.
        codec: codec of messages the service makes, unless a request names another.
        ratio: default fraction of layers a context shares (None: all layers); chosen by the
            service's layer ranking for the request's layout (a profile, loaded or calibrated once).
        selection: the rule the service calibrates a ranking with, when it has no profile for a layout.
        mode: default mask mode of the messages the service makes.
    """

    what = "service"
    token: str | None = None
    public_docs: bool = False
    served_model_names: tuple[str, ...] = ()
    max_request_bytes: int = Field(default=64 * MIB, ge=1024)
    max_message_bytes: int = Field(default=64 * MIB, ge=1024)
    max_decoded_bytes: int = Field(default=2048 * MIB, ge=1024)
    max_decoded_total_bytes: int | None = Field(default=None, ge=1024)
    max_kv_messages: int = Field(default=64, ge=1)
    max_new_tokens: int = Field(default=512, ge=1)
    default_max_tokens: int = Field(default=256, ge=1)
    timeout_s: float = Field(default=300.0, gt=0)
    max_uploads: int = Field(default=8, ge=1)
    upload_idle_s: float = Field(default=30.0, gt=0)
    prefill_chunk: int = Field(default=512, ge=1)
    codec: CodecName = "int8"
    ratio: float | None = Field(default=None, gt=0, le=1)
    selection: Rule = DEFAULT_RULE
    mode: MaskMode = "causal"


    @field_validator("token")
    @classmethod
    def _sendable(cls, token: str | None) -> str | None:
        """A token a client can send: not empty (``--token "$UNSET"`` made every request 401), ASCII
        (an HTTP header carries nothing else), and no spaces or control characters (clients strip a
        header's spaces or refuse them: ``"secret "`` could never be matched)."""
        if token is not None and not token.strip():
            raise ValueError("the token is empty (an unset variable?); leave it out to serve without one")
        if token is not None and not token.isascii():
            raise ValueError("the token must be ASCII: an HTTP header cannot carry other characters")
        if token is not None and not all(33 <= ord(char) <= 126 for char in token):
            raise ValueError("the token must be printable ASCII without spaces (a space or control character "
                             "in it, e.g. a trailing newline, cannot be sent in a header as it is)")
        return token

    @model_validator(mode="after")
    def _total_holds_one(self) -> Self:
        if self.max_decoded_total_bytes is not None and self.max_decoded_total_bytes < self.max_decoded_bytes:
            raise ValueError(f"max_decoded_total_bytes ({self.max_decoded_total_bytes:,}) is below one request's "
                             f"max_decoded_bytes ({self.max_decoded_bytes:,}): a request at its limit could never run")
        return self

    @property
    def decoded_total_bytes(self) -> int:
        """What all requests in flight may decode to together."""
        return self.max_decoded_total_bytes if self.max_decoded_total_bytes is not None else 4 * self.max_decoded_bytes
