"""Adds or replaces one ``## <heading>`` section of benchmarks/RESULTS.md (shared by all benchmarks)."""

from __future__ import annotations

import os
import re


def replace_section(path: str | os.PathLike, heading: str, body: str) -> None:
  path = os.fspath(path)
  text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
  section = f"## {heading}\n\n{body.rstrip()}\n"
  pattern = re.compile(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
  if pattern.search(text):
    text = pattern.sub(lambda _: section + "\n", text).rstrip() + "\n"
  else:
    text = text.rstrip() + "\n\n" + section
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)
