"""Hardware targets for ahead-of-time compiles: a topology name -> compile-only devices of that
platform (no accelerator needed), the device's memory, and the peaks a roofline estimate uses.

    TPU  '<gen>:<AxB[xC]>'   gen in v4, v5e, v5p, v6e (libtpu's topology names; `[tpu]` extra)
    GPU  '<gpu>:<PxHxD>'     gpu in h100, a100: P partitions x H hosts x D GPUs per host
                             (deviceless through the CUDA plugin; `[gpu-aot]` extra)

The GPU target descriptions are XLA's own GpuTargetConfig files (`gpu_targets/`, each naming its
upstream path and commit). `PEAKS` holds the vendors' published figures, one row per device with
its source; nothing here is measured.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from mole_jax.errors import ConfigError

GPU_TARGETS = {"h100": "h100_sxm.txtpb", "a100": "a100_sxm_80.txtpb"}
TPU_GENERATIONS = ("v4", "v5e", "v5p", "v6e")


@dataclasses.dataclass(frozen=True)
class Peak:
    """A device's published peaks: dense bf16 FLOP/s, HBM bytes/s, interconnect bytes/s per
    device (one direction), HBM bytes, and where the figures come from."""

    flops: float
    hbm_bytes_s: float
    link_bytes_s: float
    memory: int
    source: str


GIB = 2**30
PEAKS = {
    "h100": Peak(989e12, 3.35e12, 450e9, 84_942_979_072,
                 "NVIDIA H100 SXM datasheet (bf16 dense, HBM3, NVLink 900 GB/s both ways); "
                 "memory: XLA's h100_sxm target"),
    "a100": Peak(312e12, 2.039e12, 300e9, 85_100_068_864,
                 "NVIDIA A100 80GB SXM datasheet (bf16 dense, HBM2e, NVLink 600 GB/s both "
                 "ways); memory: XLA's a100_sxm_80 target"),
    "v4": Peak(275e12, 1.2e12, 2400e9 / 8 / 2, 32 * GIB,
               "Google Cloud TPU v4 docs (bf16, 1,200 GB/s HBM, 32 GiB; ICI 2,400 Gbps)"),
    "v5e": Peak(197e12, 0.819e12, 1600e9 / 8 / 2, 16 * GIB,
                "Google Cloud TPU v5e docs (bf16, 819 GB/s HBM, 16 GiB; ICI 1,600 Gbps)"),
    "v5p": Peak(459e12, 2.765e12, 4800e9 / 8 / 2, 95 * GIB,
                "Google Cloud TPU v5p docs (bf16, 2,765 GB/s HBM, 95 GiB; ICI 4,800 Gbps)"),
    "v6e": Peak(918e12, 1.64e12, 3584e9 / 8 / 2, 32 * GIB,
                "Google Cloud TPU v6e docs (bf16, 1,640 GB/s HBM, 32 GiB; ICI 3,584 Gbps)"),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # as given: 'v5p:4x4x4', 'h100:1x8x8'
    platform: str  # 'tpu' | 'gpu'
    device: str  # a key of PEAKS
    shape: str
    num_slices: int = 1

    @property
    def peak(self) -> Peak:
        return PEAKS[self.device]


def parse(name: str, num_slices: int = 1) -> Target:
    """'v5p:4x4x4' / 'h100:1x8x8' -> a Target; one ConfigError line for anything else."""
    device, _, shape = name.lower().partition(":")
    known = ", ".join(
        [*(f"{g}:AxBxC" for g in TPU_GENERATIONS), *(f"{g}:PxHxD" for g in GPU_TARGETS)]
    )
    if not re.fullmatch(r"\d+(x\d+){1,2}", shape) or device not in PEAKS:
        raise ConfigError(
            f"--topology={name}: expected one of {known} (e.g. v5p:4x4x4, h100:1x8x8)"
        )
    if num_slices < 1:
        raise ConfigError(f"--num_slices={num_slices} must be >= 1")
    platform = "gpu" if device in GPU_TARGETS else "tpu"
    if platform == "gpu" and (shape.count("x") != 2 or num_slices != 1):
        raise ConfigError(f"--topology={name}: a GPU topology is PxHxD (partitions x hosts x "
                          "GPUs per host), without --num_slices")  # fmt: skip
    return Target(name, platform, device, shape, num_slices)


# XLA's GPU compiler sizes the scratch of CUB's radix sort (MoE dispatch sorts its tokens) by
# asking the device, which a deviceless compile has not: it fails with "invalid device ordinal".
# Sorts are then compiled with XLA's own sort emitter; the report names the flag.
DEVICELESS_XLA_FLAGS = ("--xla_gpu_enable_cub_radix_sort=false",)


def compile_env() -> None:
    """What an ahead-of-time compile needs before jax is imported: the CPU as the only started
    backend, libtpu loadable by several processes at once (test workers), no libtpu log line
    about worker hostnames that this host does not have, and `DEVICELESS_XLA_FLAGS`."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    flags += [f for f in DEVICELESS_XLA_FLAGS if f not in flags]
    os.environ["XLA_FLAGS"] = " ".join(flags)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def devices(target: Target) -> list:
    """Compile-only devices of the target (no accelerator is touched)."""
    from jax.experimental import topologies

    try:
        if target.platform == "gpu":
            text = (Path(__file__).parent / "gpu_targets" / GPU_TARGETS[target.device]).read_text()
            topo = topologies.get_topology_desc(
                platform="cuda", topology=target.shape, target_config=text
            )
        else:
            kw = {"num_slices": target.num_slices} if target.num_slices > 1 else {}
            topo = topologies.get_topology_desc(
                platform="tpu", topology_name=f"{target.device}:{target.shape}", **kw
            )
    except (ImportError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"--topology={target.name}: no {target.platform.upper()} compiler here ({first}); "
            f"`make aot` installs the [tpu] and [gpu-aot] compilers into .venv-aot: run "
            "`.venv-aot/bin/python launch.py compile ...`"
        ) from None
    return list(topo.devices)


def mesh(target: Target, devs: list, mesh_cfg):
    """The mesh of `cfg.mesh` over a target's devices: on TPU laid onto the torus (and across
    slices, over DCN, along the first batch axis the slices divide); on GPU host by host."""
    import numpy as np
    from jax.experimental import mesh_utils
    from jax.sharding import Mesh

    from mole_jax.parallel.sharding import MESH_AXES, mesh_shape

    sizes = mesh_shape(mesh_cfg, len(devs))
    shape = [sizes[a] for a in MESH_AXES]
    if target.platform == "gpu":
        return Mesh(np.asarray(devs, dtype=object).reshape(shape), MESH_AXES)
    if target.num_slices == 1:
        grid = mesh_utils.create_device_mesh(shape, devs, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES)
    n = target.num_slices
    axis = next((i for i, a in enumerate(MESH_AXES) if a in ("data", "fsdp") and shape[i] % n == 0),
                None)  # fmt: skip
    if axis is None:
        raise ConfigError(f"--num_slices={n} divides neither mesh.data nor mesh.fsdp ({sizes})")
    ici, dcn = list(shape), [1] * len(shape)
    ici[axis], dcn[axis] = shape[axis] // n, n
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devs, allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES)
