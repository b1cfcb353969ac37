"""Another test file as a module, for its builders and helpers (imported, not copied).

    llava_video = sibling.load("tests/models/test_llava_video.py")

Test files are not a package, so they are loaded by path from the repository root; the
module is named after the file.
"""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(rel: str):
  """The test file at ``rel`` (relative to the repository root), executed as a module."""
  spec = importlib.util.spec_from_file_location(os.path.basename(rel)[: -len(".py")], os.path.join(ROOT, rel))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
