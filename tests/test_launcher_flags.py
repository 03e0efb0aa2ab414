"""The tests run in one process: the absl flags of every experiments module they import there
must not clash (absl refuses a flag defined twice, and the whole module's tests then fail)."""

import ast
import collections
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _defined_flags(module: str) -> set[str]:
  """Names of the flags `experiments/<module>.py` defines at import (flags.DEFINE_* and
  config_flags.DEFINE_config_file calls at module level)."""
  tree = ast.parse(open(os.path.join(REPO, "experiments", f"{module}.py")).read())
  names = set()
  for node in tree.body:
    call = node.value if isinstance(node, (ast.Assign, ast.Expr)) else None
    if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
        and call.func.attr.startswith("DEFINE") and call.args
        and isinstance(call.args[0], ast.Constant)):
      names.add(call.args[0].value)
  return names


def _imported_in_process() -> set[str]:
  """experiments modules that some test module imports (`from experiments import x`), at any
  depth of the test file."""
  modules = set()
  for name in os.listdir(os.path.join(REPO, "tests")):
    if name.endswith(".py"):
      tree = ast.parse(open(os.path.join(REPO, "tests", name)).read())
      for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "experiments":
          modules.update(alias.name for alias in node.names)
  return modules


def test_the_flag_scan_sees_a_launchers_flags():
  assert {"experiment", "scale", "out", "seeds"} <= _defined_flags("reproduce")
  assert {"scale", "passes", "out"} <= _defined_flags("cpu_levers")


def test_experiments_modules_the_tests_import_define_no_flag_twice():
  owners = collections.defaultdict(list)
  for module in sorted(_imported_in_process()):
    for flag in _defined_flags(module):
      owners[flag].append(module)
  clashes = {flag: mods for flag, mods in owners.items() if len(mods) > 1}
  assert not clashes, (f"flags defined by more than one experiments module the tests import in "
                       f"one process: {clashes}; keep what tests need in a flag-free module")
