"""On-disk formats: writers (name → class, the ``--format`` table) and readers of what they write."""

from __future__ import annotations
