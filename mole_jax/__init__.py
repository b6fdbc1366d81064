"""mole_jax: dense, MoE, PEER and MoLE language models on one JAX/Flax NNX backbone.

Packages by layer, lowest first; a module imports only its own layer and those below it
(`tests/test_structure.py` checks the order):

    errors, files, config, workdir, progress, platforms   the ground floor
    parallel   mesh, logical-axis rules, multi-host runtime
    data       corpora, tokenisation, token cache, batches, Megatron reader, dedup
    model      typed config, backbone, attention, layers, scan, ffn/ (one module per kind)
    stores     store format, quantisation, digests, LUT and expert stores
    train      validation, trainer, loop, checkpoints, preemption, optimiser, losses, metrics,
               accounting, memory plan, Read-ME conversion
    infer      engines, export, generation, offload caches/policies, Read-ME serving
    interop    Hugging Face checkpoints in (import) and out (export --format=hf)
    eval       validation loss, lm-eval adapter, zero-shot, the offline task pack
    sweeps     studies' runs, workers, SLURM, reports
    cli        the subcommands behind launch.py
"""

__version__ = "0.1.0"

# The layer order, lowest first: the single source for the docstring above and the test.
LAYERS = (
    ("errors", "files", "config", "workdir", "progress", "platforms"),
    ("parallel",),
    ("data",),
    ("model",),
    ("stores",),
    ("train",),
    ("infer",),
    ("interop",),
    ("eval",),
    ("sweeps",),
    ("cli",),
)
