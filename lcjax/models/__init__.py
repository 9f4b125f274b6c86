"""Compositions of layers: the decoder LM with a per-layer block pattern, and encoder models."""
