"""Tokenizers, sources, grain pipelines and packing."""
