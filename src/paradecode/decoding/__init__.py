"""Shared decoding machinery: output sink, verifier helpers."""
