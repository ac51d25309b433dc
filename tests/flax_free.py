"""Which top-level packages a bnjax module pulls in, following its imports inside bnjax (the
package `__init__` files aside: they are the lead's re-exports). Used to keep flax out of modules
that must work without it."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def external_imports(module: str, seen: set[str] | None = None) -> set[str]:
  seen = set() if seen is None else seen
  if module in seen:
    return set()
  seen.add(module)
  path = ROOT / (module.replace(".", "/") + ".py")
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:  # `from bnjax import stats` too.
      names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    else:
      names = []
    for name in names:
      if name.split(".")[0] == "bnjax":
        if (ROOT / (name.replace(".", "/") + ".py")).exists():
          found |= external_imports(name, seen)
      else:
        found.add(name.split(".")[0])
  return found
