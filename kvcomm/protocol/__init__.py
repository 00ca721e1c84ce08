"""The communication protocol: sender prefill, receiver cache surgery, masks, decoding."""

from kvcomm.protocol import attention as _attention  # registers the "kvcomm" attention
from kvcomm.protocol.layout import MASK_MODES, AttentionLayout, ImportanceRecorder
from kvcomm.protocol.receiver import (
    ReceiverInput,
    SharedKV,
    attention_importance,
    build_receiver_input,
    concat_shared,
    empty_input,
    greedy_generate,
    prefill_logits,
    receiver_input,
    share,
)
from kvcomm.protocol.sender import SenderKV, merge_senders, pad_left, prefill

ATTENTION_NAME = _attention.ATTENTION_NAME

__all__ = [
    "ATTENTION_NAME", "MASK_MODES", "AttentionLayout", "ImportanceRecorder", "ReceiverInput", "SenderKV", "SharedKV",
    "attention_importance", "build_receiver_input", "concat_shared", "empty_input", "greedy_generate",
    "merge_senders", "pad_left", "prefill", "prefill_logits", "receiver_input", "share",
]
