"""The device mesh from `cfg.mesh`, the logical-axis rules, and placement helpers.

Every parameter is created with the logical names of its axes (`nnx.Param(..., logical_axes=
("embed", "mlp"))`, flax NNX variable metadata); `RULES` maps logical names to mesh axes, the
pattern of flax's lm1b example and MaxText. The model files never name a mesh axis: they name
logical axes (`constrain(x, "batch", "length", "embed")`), which mean nothing without a mesh.

Mesh axes (`cfg.mesh`, one of them may be -1 = the remaining devices):
    data    plain data parallelism: parameters replicated, the batch split
    fsdp    the batch split and the parameters' `embed` dimension sharded (ZeRO-3 style)
    expert  the batch split and the experts (MoE, MoLE routed experts, PEER rows) sharded
    tensor  the `mlp`, `heads` and `vocab` dimensions sharded (Megatron-style tensor parallel)

Why not flax's `out_sharding` metadata: with NNX's eager sharding it makes every variable
creation require a mesh, so a model could not be built on one device without one. Here a model
is built anywhere; the train state is created sharded by `jax.jit(init, out_shardings=...)`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mole_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")  # the axes that split the batch

# logical axis -> mesh axes it is split over, in order (an axis already used by an earlier
# dimension of the same array is skipped).
RULES: dict[str, tuple[str, ...]] = {
    "batch": BATCH_AXES,
    "length": (),
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "experts": ("expert",),
    "rows": ("expert", "fsdp"),  # PEER's N = n^2 single-neuron expert rows
    "keys": (),  # PEER's sub-keys
    "norm": (),
}


def mesh_shape(mesh_cfg, n_devices: int) -> dict[str, int]:
    """{axis: size} of `cfg.mesh` for `n_devices`, the one -1 resolved; ConfigError otherwise."""
    sizes = {a: mesh_cfg[a] for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    bad = [a for a, s in sizes.items() if not (isinstance(s, int) and (s >= 1 or s == -1))]
    if bad:
        raise ConfigError(f"mesh.{bad[0]}={sizes[bad[0]]!r} must be a positive integer or -1")
    if len(free) > 1:
        raise ConfigError(f"mesh.{free[0]} and mesh.{free[1]} are both -1; at most one may be")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if n_devices % fixed:
            raise ConfigError(
                f"mesh.{free[0]}=-1: the other mesh axes ({fixed} devices) do not divide the "
                f"{n_devices} devices"
            )
        sizes[free[0]] = n_devices // fixed
    elif fixed != n_devices:
        shape = ", ".join(f"{a}={s}" for a, s in sizes.items())
        raise ConfigError(f"mesh {shape} holds {fixed} devices, not the {n_devices} available")
    return sizes


def make_mesh(mesh_cfg, devices: Sequence | None = None) -> Mesh:
    """The mesh of `cfg.mesh` over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(mesh_cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return Mesh(np.array(devices).reshape(shape), MESH_AXES)


def batch_ways(mesh_sizes: dict[str, int]) -> int:
    """How many ways the batch is split."""
    return math.prod(mesh_sizes[a] for a in BATCH_AXES)


def logical_spec(names: Sequence[str | None], mesh: Mesh | None = None) -> PartitionSpec:
    """The PartitionSpec of an array whose axes have logical `names` (None: not split). Mesh
    axes of size 1 in `mesh` are left out (they split nothing)."""
    used: set[str] = set()
    out = []
    for name in names:
        axes = []
        for a in RULES[name] if name is not None else ():
            if a in used or (mesh is not None and mesh.shape.get(a, 1) == 1):
                continue
            axes.append(a)
            used.add(a)
        out.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return PartitionSpec(*out)


def current_mesh():
    """The mesh set by `jax.set_mesh` around tracing, or None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def platform() -> str:
    """'cpu' | 'gpu' | 'tpu': the platform of the mesh the step is traced under (`jax.set_mesh`),
    else the host's default backend. Every backend-dependent code path reads this, never
    `jax.default_backend()` alone, so that a step compiled ahead of time for a TPU topology or GPU
    target from a CPU host takes the target's paths, as it will when it runs there."""
    mesh = current_mesh()
    name = mesh.abstract_device.platform if mesh is not None else jax.default_backend()
    return {"cuda": "gpu", "rocm": "gpu"}.get(name, name)


def constrain(x, *names: str | None):
    """`x` constrained to the logical axes `names` when a mesh is set; `x` unchanged otherwise
    (one device, inference engines)."""
    mesh = current_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(names, mesh))


def mesh_axes(name: str) -> tuple[str, ...]:
    """The mesh axes (of size > 1) the logical axis `name` is split over in the current mesh."""
    mesh = current_mesh()
    if mesh is None:
        return ()
    return tuple(a for a in RULES[name] if mesh.shape.get(a, 1) > 1)


def variable_specs(abstract_state, mesh: Mesh):
    """A PartitionSpec for every variable of an `nnx.State` (from its `logical_axes`
    metadata; replicated without it), as a pure dict like `nnx.to_pure_dict`."""
    from flax import nnx

    def spec(var):
        names = var.get_metadata().get("logical_axes")
        if names is None:
            return PartitionSpec()
        if len(names) != len(var.shape):
            raise ValueError(f"logical axes {names} do not match the shape {var.shape}")
        return logical_spec(names, mesh)

    specs = jax.tree.map(spec, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(specs)


def shardings(specs, mesh: Mesh):
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def follow_params(tree, param_specs: dict):
    """PartitionSpecs for a tree that holds copies of the parameters (optimiser moments):
    a leaf whose key path ends with a parameter's path gets that parameter's spec; the others
    (step counts) are replicated."""
    by_path = {
        _keys(path): s
        for path, s in jax.tree_util.tree_flatten_with_path(
            param_specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
        )[0]
    }
    longest = max((len(k) for k in by_path), default=0)

    def find(path, leaf):
        keys = _keys(path)
        for n in range(min(longest, len(keys)), 0, -1):
            if keys[-n:] in by_path and by_path[keys[-n:]] is not None:
                return by_path[keys[-n:]]
        return PartitionSpec()

    return jax.tree_util.tree_map_with_path(find, tree)


def _keys(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)
