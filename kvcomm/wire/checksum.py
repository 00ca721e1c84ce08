"""The frames' checksum: CRC-32 (zlib's polynomial and values), computed by zlib-ng.

Every frame of a message carries the CRC-32 of its bytes, and a reader computes it again for every
frame before decoding it. CPython's ``zlib.crc32`` (zlib 1.2.13) took 32–46 µs per 100 kB on
this project's AVX2 CPU, zlib-ng's (carry-less multiplication) about 7 µs: on a 1,024-token
SmolLM2 ``int2-ans`` message (3.1 MB) that is 1.0–1.4 ms against 0.2 ms, against about 20 ms
for the whole read. The values are zlib's bit for bit (``tests/test_wire.py`` compares them), so
no message format changes.
"""

from __future__ import annotations

from zlib_ng.zlib_ng import crc32

__all__ = ["crc32"]
