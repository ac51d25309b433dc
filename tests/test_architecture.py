"""The library's structure, checked: where collectives live, what the core imports, one constant.

Statistics are computed in `bnjax/stats.py` and every `lax` collective is called from
`bnjax/distributed.py`; the pure core runs without Flax.
"""

import ast
import pathlib
import subprocess
import sys

import bnjax

PACKAGE = pathlib.Path(bnjax.__file__).parent
COLLECTIVES = frozenset({"psum", "pmean", "pmax", "pmin", "all_gather", "psum_scatter",
                         "ppermute", "pshuffle", "pswapaxes", "all_to_all", "ragged_all_to_all",
                         "psend", "precv", "axis_index"})


def _collective_calls(path):
  """Names of `lax` collectives that a module calls or imports (`lax.psum`, `jax.lax.psum`,
  `from jax.lax import psum`)."""
  tree = ast.parse(path.read_text())
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES:
      base = node.value
      if (isinstance(base, ast.Name) and base.id == "lax") or (
          isinstance(base, ast.Attribute) and base.attr == "lax"):
        found.append(f"{path.name}:{node.lineno} lax.{node.attr}")
    if isinstance(node, ast.ImportFrom) and node.module in ("jax.lax", "jax._src.lax.parallel"):
      found += [f"{path.name}:{node.lineno} {a.name}" for a in node.names if a.name in COLLECTIVES]
  return found


def test_collectives_are_called_only_in_distributed():
  offenders = []
  for path in sorted(PACKAGE.rglob("*.py")):
    if path.name != "distributed.py":
      offenders += _collective_calls(path)
  assert offenders == [], offenders


def test_the_guard_sees_a_collective(tmp_path):
  probe = tmp_path / "probe.py"
  probe.write_text("from jax import lax\nfrom jax.lax import pmean\nimport jax\n"
                   "lax.psum(x, 'i')\njax.lax.all_gather(x, 'i')\n")
  assert len(_collective_calls(probe)) == 3
  assert _collective_calls(PACKAGE / "distributed.py")  # and it does see distributed.py's.


def test_batch_norm_runs_without_importing_flax():
  code = ("import sys, jax.numpy as jnp, bnjax\n"
          "p, s = bnjax.init(3)\n"
          "bnjax.batch_norm(p, s, jnp.ones((4, 3)), True)\n"
          "import bnjax.tools.fold, bnjax.interop\n"
          "assert 'flax' not in sys.modules, sorted(m for m in sys.modules if 'flax' in m)\n"
          "bnjax.BatchNorm\n"
          "assert 'flax' in sys.modules\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False, env={"JAX_PLATFORMS": "cpu", "PATH": ""})
  assert result.returncode == 0, result.stderr[-2000:]


def test_the_cancellation_limit_is_defined_once():
  definitions = [f"{p.name}" for p in PACKAGE.rglob("*.py")
                 if "MAX_CANCELLATION =" in p.read_text()]
  assert definitions == ["stats.py"], definitions
