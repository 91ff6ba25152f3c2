"""Quantization primitives: grids (choose parameters → quantize → dequantize) and the value that carries codes
from a method to a format."""
