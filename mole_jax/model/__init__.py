"""The model: the typed model config, the shared transformer backbone (embedding, blocks,
attention with RoPE and a KV cache, norms, head), `model.scan_layers`, and `ffn/` with one module
per FFN kind behind one protocol. Modules compute logits and aux stats only: no losses,
optimisers, files or stores. Imports the ground floor, `parallel` and `data`.
"""
