"""Benchmarks of speed and memory: ``momentkv bench`` and the attention-heavy benchmark."""
