# SPDX-License-Identifier: MIT
"""Runnable examples: ``python -m dmoe.examples.convert_minilm`` (docs/conversion.md)."""
