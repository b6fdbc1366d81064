"""mole_jax: dense, MoE, PEER and MoLE language models on one JAX/Flax NNX backbone."""

__version__ = "0.1.0"
