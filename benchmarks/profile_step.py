"""Where the train step's time goes on XLA:CPU: one traced step of ``train_step.py``'s model.

  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/profile_step.py [--batch=4] [--seq=256] [--top=25]

Runs ``train_step.py``'s llava_jax step (same ~100M LLaVA, same batch, float32), warms it
up, traces one step with ``jax.profiler`` and reads the trace's XLA op events (one per
HLO instruction run on the executor threads). Prints:
  * op time per kind of op (fusion names without their number: ``ynn_fusion`` = YNNPACK
    dots, ``multiply_add_fusion`` = elementwise, ...);
  * how busy the cores were: wall time of the step, time covered by some op, and time
    with 0, 1, 2, ... ops running at once;
  * each dot's achieved GFLOP/s, grouped by shape and by the model op it comes from
    (``F`` forward, ``T`` from the backward pass), with the shapes read from the
    compiled executable's optimized HLO.
A dot that XLA leaves outside a fusion runs on Eigen; its trace event times only the
dispatch, so such dots are listed apart and not given a rate. Op time summed over
threads exceeds the wall time when ops overlap. The numbers behind RESULTS.md's "Train
step: profile and the limit of this CPU" came from this analysis.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([\w\-]+)\((.*?)\)(.*)$")
_COMP = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")


def parse_hlo(text: str) -> tuple[dict, dict]:
  """Instructions by name (shape, opcode, operand names, attributes) and, per
  computation, the names of its instructions."""
  instrs, comps, current = {}, collections.defaultdict(list), None
  for line in text.splitlines():
    m = _COMP.match(line)
    if m:
      current = m.group(1)
      continue
    m = _INSTR.match(line)
    if m:
      name, shape, opcode, operands, attrs = m.groups()
      instrs[name] = (shape, opcode, re.findall(r"%([\w.\-]+)", operands), attrs)
      comps[current].append(name)
  return instrs, comps


def _dims(shape: str) -> list[int]:
  m = re.match(r"\w+\[([\d,]*)\]", shape)
  return [int(d) for d in m.group(1).split(",") if d] if m else []


def dot_info(instrs: dict, name: str) -> tuple[float, str]:
  """FLOPs of one ``dot`` instruction and a label: operand shapes, F/T, model op."""
  shape, _, operands, attrs = instrs[name]
  lhs = _dims(instrs[operands[0]][0])
  contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs).group(1)
  k = 1
  for d in contracting.split(","):
    k *= lhs[int(d)]
  n = 1
  for d in _dims(shape):
    n *= d
  op = re.search(r'op_name="[^"]*?([^"/]*/[^"/]*)/(?:dot_general|transpose)"', attrs)
  pass_ = "T" if "transpose(" in attrs else "F"
  label = (
      f"{instrs[operands[0]][0].split('{')[0]} x {instrs[operands[1]][0].split('{')[0]} "
      f"{pass_} {op.group(1) if op else ''}"
  )
  return 2.0 * n * k, label


def op_events(trace_dir: str) -> list[dict]:
  """The XLA op events of the trace (executor threads, without the executor's own spans)."""
  path = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)[0]
  events = json.load(gzip.open(path))["traceEvents"]
  threads = {
      (e["pid"], e["tid"]): e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"
  }
  return [
      e
      for e in events
      if e.get("ph") == "X"
      and threads.get((e["pid"], e["tid"]), "").startswith("tf_XLAEigen")
      and not e["name"].startswith(("ThunkExecutor", "SlinkyThreadPool"))
  ]


def occupancy(events: list[dict]) -> tuple[float, dict[int, float]]:
  """Wall time (us) from the first op's start to the last op's end, and the time
  with 0, 1, 2, ... ops running."""
  edges = sorted([(e["ts"], 1) for e in events] + [(e["ts"] + e["dur"], -1) for e in events])
  levels: dict[int, float] = collections.Counter()
  running, last = 0, edges[0][0]
  for t, delta in edges:
    levels[running] += t - last
    running, last = running + delta, t
  return edges[-1][0] - edges[0][0], levels


def report(events: list[dict], hlo_text: str, top: int) -> list[str]:
  instrs, comps = parse_hlo(hlo_text)
  kinds, counts = collections.Counter(), collections.Counter()
  for e in events:
    kind = re.sub(r"[.\d]+$", "", e["name"])
    kinds[kind] += e["dur"]
    counts[kind] += 1
  total = sum(kinds.values())
  wall, levels = occupancy(events)
  lines = [
      f"op time {total / 1e3:.0f} ms summed over threads; step wall {wall / 1e3:.0f} ms, "
      f"some op running {(wall - levels[0]) / 1e3:.0f} ms; "
      + ", ".join(f"{n} at once {t / 1e3:.0f} ms" for n, t in sorted(levels.items()) if n and t >= 500),
      "",
      "| op kind | ms | share | count |",
      "|---|---:|---:|---:|",
  ]
  lines += [f"| {k} | {t / 1e3:.1f} | {t / total:.1%} | {counts[k]} |" for k, t in kinds.most_common(top)]

  groups = collections.defaultdict(lambda: [0.0, 0.0, 0])  # label -> [us, flops, count]
  eigen = collections.Counter()
  for e in events:
    if e["name"] not in instrs:
      continue
    _, opcode, _, attrs = instrs[e["name"]]
    if opcode == "dot":
      eigen[dot_info(instrs, e["name"])[1]] += 1
    elif opcode == "fusion":
      called = re.search(r"calls=%([\w.\-]+)", attrs).group(1)
      dots = [dot_info(instrs, n) for n in comps[called] if instrs[n][1] == "dot"]
      if dots:
        g = groups[" + ".join(label for _, label in dots)]
        g[0] += e["dur"]
        g[1] += sum(f for f, _ in dots)
        g[2] += 1
  flops = sum(g[1] for g in groups.values())
  us = sum(g[0] for g in groups.values())
  lines += [
      "",
      f"dots in fusions: {flops / 1e9:.1f} GFLOP in {us / 1e3:.0f} ms of op time, "
      f"{flops / us / 1e3:.1f} GFLOP/s (overlapping dots share the cores)",
      "",
      "| dot (operands, F fwd / T bwd, model op) | count | ms | GFLOP/s |",
      "|---|---:|---:|---:|",
  ]
  for label, (t, f, c) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
    lines.append(f"| {label} | {c} | {t / 1e3:.1f} | {f / t / 1e3:.1f} |")
  if eigen:
    lines += ["", "dots outside fusions (Eigen; their events time only the dispatch):"]
    lines += [f"  {c} x {label}" for label, c in eigen.most_common(top)]
  return lines


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--top", type=int, default=25)
  a = p.parse_args()

  import jax
  import train_step

  _, cfg, params = train_step.build_models()
  batch = train_step.make_batch(cfg.image_token_id, cfg.num_image_tokens, a.batch, a.seq)
  run = train_step.jax_stepper(cfg, params, batch)
  for _ in range(2):
    jax.block_until_ready(run(batch)["loss"])
  trace_dir = tempfile.mkdtemp()
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    jax.block_until_ready(run(batch)["loss"])
  print("\n".join(report(op_events(trace_dir), run.compiled.as_text(), a.top)))


if __name__ == "__main__":
  main()
