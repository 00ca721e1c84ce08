"""A frame's payload as named tensors: safetensors parses and checks it, numpy wraps the bytes.

``safetensors.torch.load`` builds each tensor with ``torch.frombuffer`` and ``reshape``, about 7 µs a
tensor here; a layer of an entropy-coded codec holds 10 to 14 small tensors, so reading a whole
1,024-token SmolLM2 message spent more time there than in its checksums. This reads the same
``deserialize`` output through numpy views instead (under 1 µs a tensor) and hands torch the
arrays, the same values and dtypes as ``safetensors.torch.load`` gives (``tests/test_wire.py``
compares the two on every codec's payloads).
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from safetensors import deserialize

_NUMPY = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
          "U8": "u1", "BOOL": "?"}
_VIEWED = {"BF16": ("<i2", torch.bfloat16)}  # no numpy type: read as int16, then viewed as torch's
# per safetensors dtype: how numpy reads it, and the torch dtype to view it as (None: numpy's own)
_READ = {**{kind: (np.dtype(read), None) for kind, read in _NUMPY.items()},
         **{kind: (np.dtype(read), as_torch) for kind, (read, as_torch) in _VIEWED.items()}}
_SWAP = sys.byteorder == "big"  # safetensors is little-endian


def payload_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """The tensors in a safetensors ``data`` blob, each owning a copy of its bytes.

    Raises:
        SafetensorError: a blob safetensors refuses (its header, offsets, sizes).
        ValueError: a dtype no codec writes (float8, unsigned 16- to 64-bit).
    """
    tensors: dict[str, torch.Tensor] = {}
    for name, view in deserialize(data):
        if (reading := _READ.get(view["dtype"])) is None:
            raise ValueError(f"tensor {name!r} has dtype {view['dtype']}, which no codec writes")
        read, as_torch = reading
        array = np.frombuffer(view["data"], dtype=read).reshape(view["shape"])
        if _SWAP and array.dtype.byteorder == "<":
            array = array.astype(array.dtype.newbyteorder("="))
        tensor = torch.from_numpy(array)
        tensors[name] = tensor if as_torch is None else tensor.view(as_torch)
    return tensors
