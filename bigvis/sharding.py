"""Device mesh and logical-axis rules: where parameters, optimizer state and batches live.

The mesh has three named axes, `data`, `fsdp` and `tensor`, sized by the config
(-1 takes the remaining devices). Modules name their parameter and activation
axes logically; the rules below (overridable by `config.sharding_rules`) map
logical names to mesh axes. A dimension that does not divide evenly over its
mesh axes is split over the leading ones that divide it, else replicated, so
small heads and odd vocabularies never block a layout.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from flax import traverse_util
from jax import shard_map
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bigvis.config import check_known
from bigvis.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axes. Parameters: `embed` over fsdp (ZeRO-3 style), heads
# and MLP units over tensor (Megatron style). Activations (`act_*`): the batch
# over data and fsdp, hidden units over tensor. `representation` is the input of
# a classifier behind a pre-logits layer: its other side, the classes, rarely
# divides the mesh (21,843), so it takes both axes, tensor first to line up with
# the pre-logits output it multiplies, fsdp so FSDP splits the 22M-parameter
# i21k head rather than keeping it and its Adam state whole on every device
# (or whichever of the two a user's rule has left). Rules for other names are
# refused: a misspelt one would be silently ignored.
# `use_mesh` keeps the classic context on purpose; say so once, not on every call.
warnings.filterwarnings("ignore", message=".*mesh.*context manager has been deprecated", category=DeprecationWarning)

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("act_batch", BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("representation", ("tensor", "fsdp")),
    ("representation", "fsdp"),
    ("representation", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("classes", None),
    ("layers", None),
    ("norm", None),
    ("patch", None),
    ("length", None),
)

LOGICAL_AXES = tuple(dict.fromkeys(name for name, _ in DEFAULT_RULES))


def mesh_shape(mesh_config: ml_collections.ConfigDict | dict, num_devices: int) -> tuple[int, int, int]:
  """Resolves -1 entries; errors when the sizes don't multiply to the device count."""
  check_known(mesh_config, MESH_AXES, "mesh")
  missing = [a for a in MESH_AXES if a not in mesh_config]
  if missing:
    raise UserError(f"mesh.{missing[0]} is not set; the mesh needs {', '.join(MESH_AXES)} (-1 for one of them: the rest).")
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  unknown = [i for i, s in enumerate(sizes) if s == -1]
  if len(unknown) > 1:
    raise UserError("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1.")
  if any(s == 0 or s < -1 for s in sizes):
    raise UserError(f"mesh sizes must be positive or -1, got data={sizes[0]}, fsdp={sizes[1]}, tensor={sizes[2]}.")
  known = int(np.prod([s for s in sizes if s != -1]))
  if unknown:
    if num_devices % known:
      raise UserError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} do not divide the {num_devices} devices.")
    sizes[unknown[0]] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise UserError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {int(np.prod(sizes))} "
                    f"devices, but {num_devices} are present; set mesh sizes that multiply to {num_devices} "
                    "or use -1 for one axis.")
  return tuple(sizes)


def make_mesh(mesh_config: ml_collections.ConfigDict | dict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The (data, fsdp, tensor) mesh, laid out so tensor and fsdp stay within fast links."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_config, len(devices))
  try:
    arr = jax.experimental.mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # topologies mesh_utils does not know (e.g. CPU): plain order
    arr = np.asarray(devices).reshape(shape)
  return Mesh(arr, MESH_AXES)


def mesh_and_rules(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None,
                   what: str = "devices") -> tuple[Mesh, tuple]:
  """The config's mesh over `devices` and its logical rules; the global batch must split over it."""
  mesh = make_mesh(config.mesh, devices)
  dp = data_parallel_size(mesh)
  if config.batch_size % dp:
    raise UserError(f"batch_size={config.batch_size} is not divisible by the {dp} data-parallel {what} "
                    f"(mesh data x fsdp); use a multiple of {dp}.")
  return mesh, rules_from_config(config)


def rules_from_config(config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
  """Default rules with `config.sharding_rules` ([[logical, mesh_axes], ...]) taking precedence."""
  overrides = [tuple(r) for r in (config.get("sharding_rules") or ())]
  for rule in overrides:
    if len(rule) != 2:
      raise UserError(f"sharding rule {rule!r} is not a [logical_axis, mesh_axes] pair.")
    if rule[0] not in LOGICAL_AXES:
      raise UserError(f"sharding rule {rule!r} names logical axis '{rule[0]}', not one of "
                      f"{', '.join(LOGICAL_AXES)}.")
    axes = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
    for a in axes:
      if (a is not None or len(axes) > 1) and a not in MESH_AXES:
        raise UserError(f"sharding rule {rule!r} names mesh axis '{a}', not one of {MESH_AXES}.")
  names = {r[0] for r in overrides}
  return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in overrides) + tuple(
      r for r in DEFAULT_RULES if r[0] not in names)


def mesh_axes_size(mesh: Any, axes: str | tuple[str, ...] | None) -> int:
  """How many devices a PartitionSpec entry (a mesh axis, a tuple of them, or None) splits a dim over."""
  if axes is None:
    return 1
  return int(np.prod([mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,))]))


def fit_spec(spec: P, shape: tuple[int, ...], mesh: Any) -> P:
  """Drops mesh axes from dimensions they do not divide evenly: of a tuple of axes, the trailing
  ones until the rest divides (the leading axes keep their blocks, so the split stays aligned with
  activations split over those alone)."""
  def fit(dim, axes):
    if axes is None or axes is P.UNCONSTRAINED:
      return axes
    if not isinstance(axes, tuple):
      return axes if dim % mesh_axes_size(mesh, axes) == 0 else None
    while axes and dim % mesh_axes_size(mesh, axes):
      axes = axes[:-1]
    return axes or None
  return P(*(fit(dim, axes) for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))))


def per_device(call: Any, args: tuple, in_specs: tuple | None, out_specs: Any) -> Any:
  """`call(*args)` on each device's own shard under the abstract mesh of the activation rules, for an
  operation XLA's partitioner has no rule for (a Pallas call, a layout constraint), around which it
  would otherwise gather the activations onto every device; directly without a mesh of more than
  one device, or without specs (`in_specs` None: no sharding to follow).

  Used inside custom VJPs, around each such call, not around the custom VJP: then no shard_map is
  transposed by autodiff, which (without replication checking) would sum a gradient over the axes
  its input is replicated on, an activation-sized all-reduce under tensor parallelism.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if in_specs is None or mesh.empty or mesh.size == 1:
    return call(*args)
  # check_vma=False: such an op's outputs (a Pallas call's, a layout constraint's) carry no record of
  # which mesh axes they vary over.
  return shard_map(call, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings for a tree of (possibly boxed) abstract values from `eval_shape(init)`."""
  specs = nn.get_partition_spec(abstract_tree)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  shapes = jax.tree.map(lambda x: x.shape, nn.meta.unbox(abstract_tree))
  return jax.tree.map(lambda spec, shape: NamedSharding(mesh, fit_spec(spec, shape, mesh)),
                      mesh_specs, shapes, is_leaf=lambda x: isinstance(x, P))


def copied_parameters(abstract_tree: Any, shardings: Any, mesh: Any) -> dict[str, int]:
  """Elements each device holds of each parameter beyond an even split over fsdp x tensor, the axes
  that split parameters, by '/'-joined path and most first: norms and biases are expected here, a
  weight matrix means a rule misses it or its dimensions do not divide the mesh. Negative (last)
  where a user's rule splits a parameter over `data` too, so the values sum to the difference."""
  split = mesh.shape["fsdp"] * mesh.shape["tensor"]
  named = traverse_util.flatten_dict(shardings)
  copied = {}
  for path, x in traverse_util.flatten_dict(abstract_tree).items():
    extra = int(np.prod(named[path].shard_shape(x.shape))) - int(np.prod(x.shape)) // split
    if extra:
      copied["/".join(map(str, path))] = extra
  return dict(sorted(copied.items(), key=lambda kv: -kv[1]))


def most_copied(copied: dict[str, int], n: int = 3) -> str:
  """'name (+extra), ...' for the `n` most copied parameters of `copied_parameters`; '' if none."""
  return ", ".join(f"{k} (+{v:,})" for k, v in list(copied.items())[:n] if v > 0)


def use_mesh(mesh: Mesh):
  """Context that makes `mesh` current for flax's logical sharding constraints.

  The classic `with mesh:` context: flax 0.12's constraints mis-handle boxed
  parameters under `jax.set_mesh` (rank errors with tensor parallelism), so the
  switch waits for a flax that supports it. A JAX that has dropped the classic
  context gets `jax.set_mesh`.
  """
  if hasattr(type(mesh), "__enter__"):
    return mesh
  return jax.set_mesh(mesh)


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules):
  """Where models run (train step, evaluators): logical rules plus the abstract mesh.

  flax applies the models' activation constraints only when an abstract mesh
  is set; without them XLA may gather the batch over `fsdp` and keep every
  replica's activations on each device.
  """
  with nn.logical_axis_rules(rules), jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    yield


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over data and fsdp, replicated over tensor."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
  return mesh_axes_size(mesh, tuple(BATCH_AXES))


def split_host_features(batch: dict[str, np.ndarray]) -> tuple[dict, dict]:
  """(numeric arrays that can go to devices, strings and bytes that stay on the host)."""
  host = {k: v for k, v in batch.items() if np.asarray(v).dtype.kind in "OSU"}
  return {k: v for k, v in batch.items() if k not in host}, host


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Process-local numpy batch -> global jax.Arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
