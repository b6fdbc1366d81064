"""The offline lm-eval task pack `mole_offline` (YAML + jsonl under `mole_offline/`, built from the
default corpus's held-out documents by `build.py`), so zero-shot accuracy needs no hub download.
"""
