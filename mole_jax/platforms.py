"""Which JAX platforms a command starts: this host's accelerators, else the CPU alone.

jax starts every backend whose plugin is installed. On a host without the accelerator, the
plugins installed to compile for one ahead of time (the `[tpu]` and `[gpu-aot]` extras: libtpu,
the CUDA plugin) then print initialisation errors at every start. `default_to_cpu()` sets
`JAX_PLATFORMS=cpu` when the user has not chosen and the host shows no GPU (`/dev/nvidia<N>`,
ROCm's `/dev/kfd`) and no TPU (a PCI device of Google's vendor id, as jax itself looks for);
on a host with either, jax picks as it always does. Call it before jax is imported.
"""

from __future__ import annotations

import glob
import os

GOOGLE_PCI_VENDOR = "0x1ae0"


def has_accelerator() -> bool:
    if glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd"):  # NVIDIA, AMD (ROCm)
        return True
    for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(path) as f:
                if f.read().strip() == GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


DEFAULTED = "MOLE_JAX_CPU_DEFAULTED"  # marks a JAX_PLATFORMS=cpu that this module set


def default_to_cpu() -> None:
    if "JAX_PLATFORMS" not in os.environ and not has_accelerator():
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ[DEFAULTED] = "1"


def for_another_host(env: dict) -> dict:
    """`env` for a process that may run on another host (a SLURM job submitted from a login
    node): without the JAX_PLATFORMS=cpu that `default_to_cpu` chose for this host."""
    if env.get(DEFAULTED):
        env = {k: v for k, v in env.items() if k not in ("JAX_PLATFORMS", DEFAULTED)}
    return env
