"""kernels/w4a16.py's tiled int4 layout (no triton): pack_codes / unpack_codes are inverse on any shape, and every
code sits at the halfword and nibble the kernel's address arithmetic reads. Kept apart from tests/test_w4a16.py so
`make gpu-test` on the lent GPU (no hypothesis there) collects that module."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qconv.kernels import w4a16


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 150), k=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_pack_codes_round_trip_and_block_addresses(n, k, seed):
    """pack_codes ∘ unpack_codes is the identity on any shape, and every code sits where the kernel's address
    arithmetic reads it: row r, column k → halfword (r // 64)·(K'/128)·2048 + (r % 64)·32 + (k // 128)·2048 +
    ((k % 128) // 64)·16 + k % 16, nibble (k % 64) // 16; the padding holds code 0."""
    codes = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    q = w4a16.pack_codes(codes)
    np_, kp = -(-n // 64) * 64, -(-k // 128) * 128
    assert q.dtype == torch.int16 and q.shape == (np_, kp // 4)
    assert torch.equal(w4a16.unpack_codes(q, (n, k)), codes)
    flat = q.reshape(-1).to(torch.int64) & 0xFFFF
    r = torch.arange(np_)[:, None]
    c = torch.arange(kp)[None, :]
    addr = (r // 64) * (kp // 128) * 2048 + (r % 64) * 32 + (c // 128) * 2048 + ((c % 128) // 64) * 16 + c % 16
    got = (flat[addr] >> (4 * ((c % 64) // 16))) & 0xF
    want = torch.zeros(np_, kp, dtype=torch.int64)
    want[:n, :k] = codes.long()
    assert torch.equal(got, want)
