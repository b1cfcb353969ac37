"""Shared converter machinery: safetensors I/O, name-to-name mapping specs, coverage checks.

A converter is a list of ``Spec(src_key, dst_path, to_flax, from_flax)``. Loading pops
every ``src_key`` from the checkpoint, so any key left over or missing is an error that
lists the keys; shapes are checked against the model's own ``init`` shapes. Saving runs
the same specs backwards. No pickle anywhere.

Checkpoint directories may be local or on a bucket (``llava_jax.storage``): remote
``.safetensors`` files are copied once into the local cache and memory-mapped from there;
saving to a bucket writes each file locally and uploads it whole (published complete).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterable, Mapping

import jax
import ml_dtypes
import numpy as np

from llava_jax import storage

Flat = dict[tuple[str, ...], np.ndarray]

# safetensors' numpy backend cannot read bfloat16, and its flax backend puts every tensor
# on the default device (a TPU core for a 13B model). A memmap of the documented format
# (u64 header size, JSON header, raw little-endian data) reads any dtype lazily on host.
_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Lazily memory-maps one ``.safetensors`` file: name -> numpy array (any dtype)."""
  path = storage.local_copy(path)
  with open(path, "rb") as f:
    n = int(np.frombuffer(f.read(8), "<u8")[0])
    header = json.loads(f.read(n))
  header.pop("__metadata__", None)
  data = np.memmap(path, np.uint8, mode="r", offset=8 + n)
  out = {}
  for name, info in header.items():
    start, end = info["data_offsets"]
    dtype = np.dtype(_ST_DTYPES[info["dtype"]])
    out[name] = data[start:end].view(dtype).reshape(info["shape"])
  return out


def read_checkpoint_dir(path: str) -> dict[str, np.ndarray]:
  """All tensors of a HF-style directory: ``model.safetensors`` or a sharded index."""
  path = os.fspath(path)
  if path.endswith(".safetensors") and storage.isfile(path):
    return read_safetensors(path)
  index = storage.join(path, "model.safetensors.index.json")
  if storage.exists(index):
    files = sorted(set(storage.read_json(index)["weight_map"].values()))
  else:
    files = sorted(f for f in storage.listdir(path) if f.endswith(".safetensors"))
  if not files:
    found = storage.listdir(path)
    raise FileNotFoundError(
        f"no .safetensors weights in {path} (found {found}); convert .bin/pickle checkpoints to safetensors first"
    )
  tensors: dict[str, np.ndarray] = {}
  for name in files:
    tensors.update(read_safetensors(storage.join(path, name)))
  return tensors


def write_safetensors_dir(
    tensors: Mapping[str, np.ndarray], path: str, max_shard_bytes: int | None = None, metadata: dict | None = None
):
  """Writes ``model.safetensors`` or, past ``max_shard_bytes``, shards plus an index.

  Files are written under temporary names and renamed (on a bucket: written locally and
  uploaded whole), so an interrupted save never leaves a half-written file under the
  final name.
  """
  from safetensors.numpy import save_file

  storage.check(path, "output directory", write=True)
  storage.makedirs(path)
  meta = {"format": "pt", **(metadata or {})}
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for k in sorted(tensors):
    a = np.ascontiguousarray(tensors[k])
    if max_shard_bytes and size and size + a.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][k] = a
    size += a.nbytes
  names = (
      ["model.safetensors"]
      if len(shards) == 1
      else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  )
  for name, shard in zip(names, shards):
    if storage.is_remote(path):
      with storage.staged_dir(path) as local:  # one file at a time: local disk holds one shard
        save_file(shard, os.path.join(local, name), metadata=meta)
      continue
    save_file(shard, os.path.join(path, name + ".tmp"), metadata=meta)
    os.replace(os.path.join(path, name + ".tmp"), os.path.join(path, name))
  if len(shards) > 1:
    total = sum(a.nbytes for a in tensors.values())
    index = {"metadata": {"total_size": int(total)}, "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
    write_json(index, storage.join(path, "model.safetensors.index.json"))


def write_json(obj: Any, path: str):
  """Pretty JSON, replaced atomically (``storage.write_atomic``)."""
  storage.write_json(obj, path, indent=2, sort_keys=True)


def read_json(path: str) -> dict:
  return storage.read_json(path)


# ----------------------------------------------------------------------------- specs


@dataclasses.dataclass(frozen=True)
class Spec:
  src: str  # checkpoint key
  dst: tuple[str, ...]  # path in our param tree
  to_flax: Callable[[np.ndarray], np.ndarray]
  from_flax: Callable[[np.ndarray], np.ndarray]


def same(src: str, dst: tuple[str, ...]) -> Spec:
  return Spec(src, dst, lambda a: a, lambda a: a)


def linear(src: str, dst: tuple[str, ...]) -> Spec:
  """torch Linear weight [out, in] <-> kernel [in, out]."""
  return Spec(src, dst, lambda a: a.T, lambda a: a.T)


def linear_to_heads(src: str, dst: tuple[str, ...], heads: int, head_dim: int) -> Spec:
  """q/k/v weight [H*D, E] <-> kernel [E, H, D]."""
  return Spec(
      src, dst, lambda a: a.T.reshape(a.shape[1], heads, head_dim), lambda a: a.reshape(a.shape[0], heads * head_dim).T
  )


def bias_to_heads(src: str, dst: tuple[str, ...], heads: int, head_dim: int) -> Spec:
  return Spec(src, dst, lambda a: a.reshape(heads, head_dim), lambda a: a.reshape(-1))


def linear_from_heads(src: str, dst: tuple[str, ...], heads: int, head_dim: int) -> Spec:
  """out-projection weight [E, H*D] <-> kernel [H, D, E]."""
  return Spec(
      src, dst, lambda a: a.T.reshape(heads, head_dim, a.shape[0]), lambda a: a.reshape(heads * head_dim, a.shape[-1]).T
  )


def conv(src: str, dst: tuple[str, ...]) -> Spec:
  """torch Conv2d weight [O, I, kh, kw] <-> flax kernel [kh, kw, I, O]."""
  return Spec(src, dst, lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1))


def prefixed(specs: Iterable[Spec], src_prefix: str, dst_prefix: tuple[str, ...]) -> list[Spec]:
  return [dataclasses.replace(s, src=src_prefix + s.src, dst=dst_prefix + s.dst) for s in specs]


def apply_specs(specs: list[Spec], tensors: dict[str, np.ndarray], what: str, ignore: Iterable[str] = ()) -> Flat:
  """Pops every spec's key from ``tensors``; errors list missing and unconsumed keys."""
  missing = [s.src for s in specs if s.src not in tensors]
  consumed = {s.src for s in specs} | set(ignore)
  extra = sorted(k for k in tensors if k not in consumed)
  if missing or extra:
    raise KeyError(
        f"{what}: checkpoint keys do not match the model config.\n"
        f"  missing ({len(missing)}): {missing[:20]}{' …' if len(missing) > 20 else ''}\n"
        f"  unexpected ({len(extra)}): {extra[:20]}{' …' if len(extra) > 20 else ''}"
    )
  return {s.dst: np.asarray(s.to_flax(np.asarray(tensors[s.src], np.float32))) for s in specs}


def invert_specs(specs: list[Spec], flat: Flat, dtype=np.float32) -> dict[str, np.ndarray]:
  missing = [s.dst for s in specs if s.dst not in flat]
  if missing:
    raise KeyError(f"params lack {len(missing)} entries needed for export: {missing[:20]}")
  extra = sorted(set(flat) - {s.dst for s in specs})
  if extra:
    raise KeyError(f"params have {len(extra)} entries no exporter spec covers: {extra[:20]}")
  return {s.src: np.asarray(s.from_flax(np.asarray(flat[s.dst], np.float32))).astype(dtype) for s in specs}


# ----------------------------------------------------------------------------- trees


def flatten(tree: Mapping) -> Flat:
  out: Flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out[tuple(str(k.key) for k in path)] = leaf
  return out


def unflatten(flat: Flat) -> dict:
  tree: dict = {}
  for path, leaf in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = leaf
  return tree


def stack_layers(flat: Flat, stack: tuple[str, ...], depth: int) -> Flat:
  """``stack/layers_{i}/…`` (one per layer) -> ``stack/layers/…`` with a leading axis."""
  n = len(stack)
  out: Flat = {k: v for k, v in flat.items() if k[:n] != stack}
  rest = sorted({k[n + 1 :] for k in flat if k[:n] == stack})
  for r in rest:
    out[stack + ("layers",) + r] = np.stack([flat[stack + (f"layers_{i}",) + r] for i in range(depth)])
  return out


def unstack_layers(flat: Flat, stack: tuple[str, ...]) -> Flat:
  """Inverse of ``stack_layers`` (a no-op for already per-layer params)."""
  n = len(stack)
  out: Flat = {}
  for k, v in flat.items():
    if k[: n + 1] == stack + ("layers",):
      for i in range(v.shape[0]):
        out[stack + (f"layers_{i}",) + k[n + 1 :]] = v[i]
    else:
      out[k] = v
  return out


def check_shapes(flat: Flat, expected: Mapping, what: str):
  """Every param present with its init shape; lists all mismatches at once."""
  want = {k: tuple(v.shape) for k, v in flatten(expected).items()}
  got = {k: tuple(v.shape) for k, v in flat.items()}
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  wrong = [(k, got[k], want[k]) for k in sorted(set(want) & set(got)) if got[k] != want[k]]
  if missing or extra or wrong:
    fmt = lambda ks: ["/".join(k) for k in ks[:20]]
    raise ValueError(
        f"{what}: converted params do not match the model.\n"
        f"  unfilled params: {fmt(missing)}\n  params with no model slot: {fmt(extra)}\n"
        f"  shape mismatches (got, want): "
        f"{[('/'.join(k), g, w) for k, g, w in wrong[:20]]}"
    )
