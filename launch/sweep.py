"""Runs a config's ``sweep()``: one training job per override set, one after another.

  python launch/sweep.py --config=configs/tiny_shapes.py:stage2,root=runs/sweep --workdir=runs/sweep/jobs [--dry_run]

Each job gets ``WORKDIR/<i>-<key=value,...>`` and the overrides as ``--config.key=value``
flags of ``python -m llava_jax.train``; on a cluster, submit these command lines instead
(``--dry_run`` prints them).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import subprocess
import sys


def jobs(config_arg: str, workdir: str) -> list[list[str]]:
  path, _, arg = config_arg.partition(":")
  spec = importlib.util.spec_from_file_location("cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  out = []
  for i, overrides in enumerate(mod.sweep()):
    name = ",".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items())
    cmd = [
        sys.executable,
        "-m",
        "llava_jax.train",
        f"--config={config_arg}",
        f"--workdir={os.path.join(workdir, f'{i:02d}-{name}')}",
    ]
    cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
    out.append(cmd)
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", required=True)
  p.add_argument("--workdir", required=True)
  p.add_argument("--dry_run", action="store_true")
  a = p.parse_args()
  commands = jobs(a.config, a.workdir)
  for i, cmd in enumerate(commands):
    print(f"[{i + 1}/{len(commands)}] {shlex.join(cmd)}", flush=True)
    if not a.dry_run:
      subprocess.run(cmd, check=True)


if __name__ == "__main__":
  main()
