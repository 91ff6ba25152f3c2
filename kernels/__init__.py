"""Triton kernels: one dequantization kernel per packed layout (each beside a plain-torch reference with the same
semantics), and the verification harness the format writers call before anything reaches disk."""
