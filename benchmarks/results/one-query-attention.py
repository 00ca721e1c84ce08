"""One attention call with one query per row (a decoding step), torch's SDPA kernel against the
float32 path that bfloat16 models now take for it (``_one_query`` in
``kvcomm/protocol/attention.py``), at SmolLM2-135M's and Qwen2.5-Coder-1.5B's head shapes, in
float32 and bfloat16, one thread. Prints milliseconds per call and the largest difference between
the two outputs.

    OMP_NUM_THREADS=1 python benchmarks/results/one-query-attention.py
"""
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kvcomm.protocol.attention import _one_query

torch.set_num_threads(1)


def ms(call: Callable[[], torch.Tensor], repeats: int = 20) -> float:
    call()
    began = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - began) / repeats * 1e3


def row(rows: int, heads: int, kv_heads: int, dim: int, keys: int, dtype: torch.dtype) -> str:
    query = torch.randn(rows, heads, 1, dim).to(dtype)
    key, value = (torch.randn(rows, kv_heads, keys, dim).to(dtype) for _ in range(2))
    mask = torch.rand(rows, 1, 1, keys) > 0.2
    mask[..., 0] = True

    def kernel() -> torch.Tensor:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=True)

    def path() -> torch.Tensor:
        return _one_query(query, key, value, mask, dim**-0.5)

    sdpa, mine = ms(kernel), ms(path)
    diff = (path().float() - kernel().float()).abs().max().item()
    return (f"| {rows}, {heads}, {kv_heads}, {dim}, {keys} | {str(dtype)[6:]} | {sdpa:.2f} | {mine:.2f} | "
            f"{sdpa / mine:.1f}× | {diff:.1e} |")


print("| shape (rows, heads, key-value heads, head size, keys) | dtype | SDPA ms | float32 path ms | ratio |"
      " max difference |")
print("|---|---|---|---|---|---|")
for shape in ((64, 9, 3, 64, 160), (25, 12, 2, 128, 250), (1, 12, 2, 128, 1100)):
    for dtype in (torch.float32, torch.bfloat16):
        print(row(*shape, dtype))
