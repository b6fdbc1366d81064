"""Evaluation: validation loss and perplexity through any engine, the lm-evaluation-harness adapter
(model name `mole_jax`) and its command line, zero-shot scoring, and the offline task pack
(`tasks/mole_offline`) built from the default corpus. Takes an engine and never asks its type.
Imports every layer below it up to `infer`.
"""
