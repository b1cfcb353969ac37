"""Timing on a shared, noisy machine (shared by the benchmarks)."""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable


def timed_interleaved(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    reduce: Callable[[list[float]], float] = statistics.median,
    warmup: bool = True,
) -> dict[str, float]:
  """Seconds per callable, ``reduce`` (median, or min for best-of) over ``repeats``.

  One warm-up call each (unless ``warmup=False``: the caller warmed up, e.g. with one
  step of a long epoch), then the callables take turns in every repeat, so that
  background load on shared cores hits all of them alike instead of whichever happened
  to run during a slow spell.
  """
  for fn in fns.values() if warmup else ():
    fn()  # warm-up / compile
  times: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t)
  return {name: reduce(ts) for name, ts in times.items()}


def host_description() -> str:
  """The CPU the numbers came from: model, family/model ids, logical CPUs and the vector
  extensions that decide float32/bfloat16 matmul speed (hosts in one pool differ)."""
  info: dict[str, str] = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if not line.strip():
          break  # the first processor's block is enough
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
  except OSError:
    import platform

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
  flags = set(info.get("flags", "").split())
  ext = [x for x in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if x in flags]
  return (
      f"{info.get('model name', '?')} (family {info.get('cpu family', '?')}, model "
      f"{info.get('model', '?')}), {os.cpu_count()} CPUs, {' '.join(ext) or 'no AVX2'}"
  )
