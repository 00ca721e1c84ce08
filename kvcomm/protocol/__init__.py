"""The communication protocol, stage by stage.

``sender.prefill`` → ``shared.share`` (cache surgery) → ``receiver.receiver_input`` →
``decoding.greedy_generate``; ``layout`` and ``attention`` make every layer's mask;
``importance`` measures what calibration ranks layers by; ``prefix`` prefills a batch's common
opening once; ``fork`` prefills rows that agree below a layer once there.
"""

from kvcomm.protocol import attention as _attention  # registers the "kvcomm" attention
from kvcomm.protocol.decoding import greedy_generate, prefill_logits
from kvcomm.protocol.fork import Fork, fork_configurations, forked_prefill
from kvcomm.protocol.importance import attention_importance
from kvcomm.protocol.layout import MASK_MODES, AttentionLayout, ImportanceRecorder, MaskMode
from kvcomm.protocol.prefix import common_prefix, continuing, prefill_shared, prefix_start
from kvcomm.protocol.receiver import ReceiverInput, build_receiver_input, empty_input, receiver_input
from kvcomm.protocol.reply import Turn, generate_turn
from kvcomm.protocol.sender import SenderKV, pad_left, prefill, run_body
from kvcomm.protocol.shared import (
    SharedKV,
    check_joinable,
    concat_shared,
    effective_layers,
    follow_on_keys,
    kept_columns,
    merge_senders,
    share,
    share_many,
    splice,
)

ATTENTION_NAME = _attention.ATTENTION_NAME

__all__ = [
    "ATTENTION_NAME", "MASK_MODES", "AttentionLayout", "Fork", "ImportanceRecorder", "MaskMode", "ReceiverInput",
    "SenderKV", "SharedKV", "Turn", "attention_importance", "build_receiver_input", "check_joinable", "common_prefix",
    "concat_shared", "continuing", "effective_layers", "empty_input", "follow_on_keys", "fork_configurations",
    "forked_prefill", "generate_turn",
    "greedy_generate", "kept_columns", "merge_senders", "pad_left", "prefill", "prefill_logits", "prefill_shared",
    "prefix_start", "receiver_input", "run_body", "share", "share_many", "splice",
]
