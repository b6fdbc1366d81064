"""Training: config validation, the trainer (state, jitted steps, sharded setup), the loop with its
metrics, checkpoints (orbax), preemption handling, optimiser and losses; the parameter / FLOP
accounting and the per-device memory plan that `summary` prints; and Read-ME's conversion of a
dense model into a pre-gated MoE, which is itself a short training run. Imports the ground floor,
`parallel`, `data`, `model` and `stores`.
"""
