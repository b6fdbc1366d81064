"""Data: named real corpora and how a fresh machine obtains them, byte-level BPE tokenisation, the
on-disk token cache and the deterministic batches drawn from it, Megatron `.bin/.idx` readers,
and the distinct-token-id helpers (dedup) that MoLE's tables use. Imports the ground floor and
`parallel`.
"""
