"""qconv: one command-line toolchain for LLM weight quantization.

Methods (qconv.methods) choose codes on a grid; formats (qconv.formats) lay them out on disk; kernels
(qconv.kernels) verify every packed layout before it is written.
"""

__version__ = "0.1.0"
