"""Which LLaVA-1.5 train steps fit which TPU slices: ahead-of-time compiles, no TPU needed.

  .venv/bin/python benchmarks/aot.py [--results=benchmarks/RESULTS.md] [--budget_min=90]

Each cell is one ``python -m llava_jax.compile`` (the train step ``llava_jax.train``
runs, compiled by libtpu's TPU compiler for the topology's abstract devices) of
configs/llava15_stage{1,2}.py at 7B and 13B with attention ``xla`` or ``pallas`` (LLM and
vision tower both), on v5e-32, v5e-256, v5p-32 and v4-32 with the config's mesh (FSDP
over every chip). Per-chip memory is the compiler's buffer assignment plus code; usable
HBM is what the compiler states (v5e 15.75, v4 30.75, v5p 95.74 GiB). For some cells the
largest global batch is searched: doubling from the recipe's batch (or halving when it
does not fit) over multiples of the batch shards, up to ``--max_batch``; refusals take
seconds, fits a compile each.

Compiles run one at a time (each 1-4 min and 2-4 GiB of host RAM on a 2-core host);
results accumulate in ``--cache`` (JSON lines), so a rerun skips cells already done and
``--table_only`` rebuilds the table from it. Cells run in priority order and none
starts after ``--budget_min``; those not run are listed under the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results import replace_section  # noqa: E402

HEADING = "Ahead-of-time compile for TPU (benchmarks/aot.py)"
RECIPE_BATCH = {1: 256, 2: 128}
MODELS = {  # key -> (table name, config argument of the stage)
    "7b": ("7B", "configs/llava15_stage{stage}.py:size=7b"),
    "13b": ("13B", "configs/llava15_stage{stage}.py:size=13b"),
    "siglip-qwen2": ("SigLIP+Qwen2-7B", "configs/siglip_qwen2.py:stage={stage}"),
}
TOPOLOGIES = {
    "v5e-32": ("v5e:4x8", 32),
    "v5e-256": ("v5e:16x16", 256),
    "v5p-32": ("v5p:2x2x4", 16),
    "v4-32": ("v4:2x2x4", 16),
}


def cells(search: str):
  """(size, stage, attn, topology, search?) of every table row."""
  out = []
  for stage in (2, 1):
    for topo in ("v5e-32", "v5p-32", "v4-32", "v5e-256"):
      for size in ("7b", "13b"):
        for attn in ("pallas", "xla"):
          want = search == "all" or (
              search == "stage2-v5e" and stage == 2 and topo in ("v5e-32", "v5e-256") and attn == "pallas"
          )
          out.append((size, stage, attn, topo, want))
  for stage in (2, 1):  # the other shipped config, as shipped (Pallas), on one slice
    out.append(("siglip-qwen2", stage, "pallas", "v5e-32", False))
  return out


def schedule(planned):
  """Priority order: stage 2 at the recipe batch, its batch searches, stage 1 with Pallas
  attention, siglip_qwen2, stage 1 with XLA attention (a budget cut drops the tail)."""
  jobs = [("cell", c) for c in planned if c[1] == 2]
  jobs += [("search", c) for c in planned if c[4]]
  jobs += [("cell", c) for c in planned if c[1] == 1 and c[2] == "pallas" and c[0] != "siglip-qwen2"]
  jobs += [("cell", c) for c in planned if c[0] == "siglip-qwen2"]
  jobs += [("cell", c) for c in planned if c[1] == 1 and c[2] == "xla"]
  return jobs


def _key(size, stage, attn, topo, batch):
  return f"{size}|{stage}|{attn}|{topo}|{batch}"


def load_cache(path: str) -> dict:
  out = {}
  if os.path.exists(path):
    for line in open(path):
      if line.strip():
        r = json.loads(line)
        out[r["key"]] = r
  return out


def compile_cell(size, stage, attn, topo, batch, cache_path, cache) -> dict:
  key = _key(size, stage, attn, topo, batch)
  if key in cache:
    return cache[key]
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "r.json")
    cmd = [
        sys.executable,
        "-m",
        "llava_jax.compile",
        "--config=" + MODELS[size][1].format(stage=stage),
        f"--topology={TOPOLOGIES[topo][0]}",
        f"--config.train.batch_size={batch}",
        f"--config.model.llm_overrides.attn_impl={attn}",
        f"--config.model.vision_overrides.attn_impl={attn}",
        f"--json={out}",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    wall = time.perf_counter() - t0
    report = json.load(open(out)) if os.path.exists(out) else {}
  r = {
      "key": key,
      "size": size,
      "stage": stage,
      "attn": attn,
      "topo": topo,
      "batch": batch,
      "rc": proc.returncode,
      "wall_s": wall,
      "report": report,
      "stderr_tail": proc.stderr[-1500:] if proc.returncode not in (0, 1, 2) else "",
  }
  with open(cache_path, "a") as f:
    f.write(json.dumps(r, default=str) + "\n")
  cache[key] = r
  gib = report.get("memory", {}).get("total", 0) / 2**30
  print(f"[{datetime.datetime.now():%H:%M:%S}] {key}: rc={proc.returncode} {gib:.2f} GiB, {wall:.0f} s", flush=True)
  return r


def search_batch(size, stage, attn, topo, cache_path, cache, max_batch, deadline):
  """Doubles (or halves) the global batch from the recipe's over multiples of the shards."""
  shards = TOPOLOGIES[topo][1]
  b = RECIPE_BATCH[stage]
  if b % shards:
    b = shards * max(1, -(-b // shards))
  r = compile_cell(size, stage, attn, topo, b, cache_path, cache)
  step = 2 if r["rc"] == 0 else 0.5
  while time.time() < deadline:
    b = int(b * step)
    if b < shards or b % shards or b > max_batch:
      return
    r = compile_cell(size, stage, attn, topo, b, cache_path, cache)
    if (r["rc"] == 0) != (step == 2):  # a fit going down, or a refusal going up: done
      return


def _fmt_cell(r) -> tuple[str, str, str, str]:
  """(per-chip GiB, % of usable HBM, headroom GiB, compile s) of one compile record."""
  rep = r["report"]
  if r["rc"] == 2:
    err = rep.get("error", "")
    if "rows per microbatch" in err:
      err = f"{r['batch']} rows over {err.split(': ')[1].split(' shards')[0]} batch shards"
    return f"does not lower ({err.split(';')[0]})", "", "", ""
  if r["rc"] not in (0, 1):
    return f"error (rc {r['rc']})", "", "", ""
  hbm = rep["hbm_bytes"] / 2**30
  if "memory" not in rep:
    over = rep.get("over_by_bytes")
    by = f" by {over / 2 ** 30:.2f}" if over is not None else ""
    return f"refused ({hbm:.2f} GiB usable; over{by})", "", "", f"{rep['compile_s']:.0f}"
  tot = rep["memory"]["total"] / 2**30
  return (f"{tot:.2f}", f"{100 * tot / hbm:.0f}%", f"{hbm - tot:.2f}", f"{rep['compile_s']:.0f}")


def largest(cache, size, stage, attn, topo) -> str:
  runs = sorted(
      (r["batch"], r["rc"])
      for r in cache.values()
      if (r["size"], r["stage"], r["attn"], r["topo"]) == (size, stage, attn, topo)
  )
  fits = [b for b, rc in runs if rc == 0]
  fails = [b for b, rc in runs if rc == 1 and (not fits or b > max(fits))]
  if not fits:
    return "none tried fits" if fails else "—"
  best = max(fits)
  if fails:
    return f"{best} ({min(fails)} refused)"
  return f">= {best}" if len(runs) > 1 or best != RECIPE_BATCH[stage] else f">= {best} (not searched)"


def table(cache, planned) -> str:
  rows = [
      "| model | stage | attention | topology (chips) | batch | per-chip GiB | of HBM | "
      "headroom GiB | largest batch that fits | compile s |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  missing = []
  for size, stage, attn, topo, _ in planned:
    b = RECIPE_BATCH[stage]
    r = cache.get(_key(size, stage, attn, topo, b))
    if r is None:
      missing.append(f"{MODELS[size][0]} stage {stage} {attn} {topo}")
      continue
    gib, pct, head, secs = _fmt_cell(r)
    rows.append(
        f"| {MODELS[size][0]} | {stage} | {attn} | {topo} ({TOPOLOGIES[topo][1]}) | {b} | "
        f"{gib} | {pct} | {head} | {largest(cache, size, stage, attn, topo)} | {secs} |"
    )
  extra = sorted(
      {
          (r["size"], r["stage"], r["attn"], r["topo"], r["batch"])
          for r in cache.values()
          if r["batch"] != RECIPE_BATCH[r["stage"]]
      }
  )
  lines = rows
  if extra:
    lines += [
        "",
        "Other batch sizes compiled (the largest-batch searches):",
        "",
        "| model | stage | attention | topology | batch | per-chip GiB | of HBM | compile s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size, stage, attn, topo, b in extra:
      gib, pct, _, secs = _fmt_cell(cache[_key(size, stage, attn, topo, b)])
      lines.append(f"| {MODELS[size][0]} | {stage} | {attn} | {topo} | {b} | {gib} | {pct} | {secs} |")
  if missing:
    lines += ["", "Not compiled (time budget): " + "; ".join(missing) + "."]
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "RESULTS.md"))
  p.add_argument("--cache", default=os.path.join(ROOT, "benchmarks", "aot_cache.jsonl"))
  p.add_argument(
      "--search",
      default="stage2-v5e",
      choices=("none", "stage2-v5e", "all"),
      help="which cells get a largest-batch search",
  )
  p.add_argument("--max_batch", type=int, default=2048)
  p.add_argument("--budget_min", type=float, default=90.0)
  p.add_argument("--table_only", action="store_true")
  a = p.parse_args()
  cache = load_cache(a.cache)
  planned = cells(a.search)
  deadline = time.time() + 60 * a.budget_min
  if not a.table_only:
    for kind, (size, stage, attn, topo, _) in schedule(planned):
      if time.time() >= deadline:
        break
      if kind == "cell":
        compile_cell(size, stage, attn, topo, RECIPE_BATCH[stage], a.cache, cache)
      else:
        search_batch(size, stage, attn, topo, a.cache, cache, a.max_batch, deadline)
  wall = sum(r["wall_s"] for r in cache.values()) / 60
  body = (
      f"{datetime.date.today()}, libtpu's compiler on a 2-core CPU host shared with other "
      f"jobs (`benchmarks/aot.py`: {len(cache)} compiles, {wall:.0f} min in all). "
      "Each row is `python -m llava_jax.compile --config=configs/llava15_stage<N>.py:"
      "size=<7b|13b> --topology=<T> --config.model.{llm,vision}_overrides.attn_impl=<A>`: "
      "bf16 compute, f32 params and Adam state, remat full, scanned layers, 2048 tokens, "
      "FSDP over every chip (`mesh.fsdp=-1`). Per-chip GiB: the compiler's buffer "
      "assignment (arguments + unaliased outputs + temporaries) + generated code, "
      "against the HBM the compiler says a program may use; `memory_analysis()` counts "
      "the donated state twice and over-reports by 1.5-5 GiB. A refusal is the "
      "compiler's own (the program does not fit); 'does not lower' is "
      "`llava_jax.train.validate` (e.g. fewer batch rows than chips). SigLIP+Qwen2-7B "
      "rows: `configs/siglip_qwen2.py:stage=<N>` as shipped (stage 1 with "
      "`train.grad_accum=2`; in one batch of 256 the compiler refuses it, 19.6 GiB). "
      "'compile s' is the compile phase alone; a command adds 10-60 s of set-up and "
      "lowering.\n\n" + table(cache, planned)
  )
  replace_section(a.results, HEADING, body)
  print(body)


if __name__ == "__main__":
  main()
