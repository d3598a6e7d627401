"""Drafters: what proposes candidate tokens for the shared draft-and-verify loop."""
