"""Parallelism: the device mesh built from `cfg.mesh`, the logical-axis rules that map parameter
and activation axis names to mesh axes, placement helpers, and JAX's multi-controller runtime
(`jax.distributed`) for runs across hosts. Imports only the ground floor (`errors`, `files`,
`config`, `workdir`, `progress`).
"""
