"""Tokenizers, indexed datasets and the embedded sample corpus."""
