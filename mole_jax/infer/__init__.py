"""Inference: engines (every way of running a trained workdir behind one protocol and one factory:
in memory, LUT in memory, LUT offloaded, MoE experts offloaded, pre-gated lookahead), `export`
that writes a trained model's experts into a store, generation, and `offload/` with the row and
expert caches, their replacement policies and Read-ME's request serving. Imports every layer
below it (ground floor up to `train`), never `eval`, `sweeps` or `cli`.
"""
