"""Suite-wide set-up, for every test path (`tests/`, the doctests in `bnjax/`, `README.md`).

8 simulated CPU devices and strict numerics, set here before JAX is imported, so that running
`pytest README.md` or `pytest bnjax` alone gets the same settings as the whole suite.

Doctest namespaces: the docstrings in `bnjax/` get `bnjax`, `jax` and `jnp` supplied, as the
library's own examples assume them. Each Python block of `README.md` is a doctest of its own that
starts from an empty namespace, so every block must import what it uses and runs as pasted into a
fresh Python.
"""

from collections.abc import Iterator
import doctest
import os
import pathlib
import re
import shutil
import sys
import tempfile

REPO_ROOT = pathlib.Path(__file__).resolve().parent
LIBRARY_DIR = REPO_ROOT / "bnjax"
README = REPO_ROOT / "README.md"

# The repository's `bnjax_examples`, `configs` and `benchmarks` packages come from this checkout.
if str(REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(REPO_ROOT))

# The suite compiles a few thousand small programs and runs each once or twice, so XLA's compile
# time is most of its time. LLVM's cheap optimisation level halves it: XLA's HLO passes (fusion,
# layout, what the budgets in tests/test_performance.py count) run as before and the arithmetic is
# IEEE's either way; only the machine code is less optimised. BNJAX_TEST_FULL_OPT=1 compiles with
# XLA's defaults instead (the benchmarks always do).
_FAST_COMPILE_FLAGS = ("" if os.environ.get("BNJAX_TEST_FULL_OPT") == "1" else
                       " --xla_backend_optimization_level=0"
                       " --xla_llvm_disable_expensive_passes=true")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + _FAST_COMPILE_FLAGS +
                           " --xla_force_host_platform_device_count=8").strip()

from _pytest import doctest as pytest_doctest  # noqa: E402  (pytest's doctest item and checker)
import jax  # noqa: E402  (the device count must be set before JAX is imported)
import pytest  # noqa: E402  (imported with JAX, after the environment is set)

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

# Many tests compile the same program (the example's training step, a layer at a common shape):
# JAX's persistent compilation cache, keyed by the program, the flags and the backend, lets the
# second compile load the first one's executable. One fresh directory per run, shared by the
# xdist workers (they inherit the variable) and removed when the run ends.
_CACHE_VARIABLE = "BNJAX_TEST_COMPILATION_CACHE"
_OWNS_CACHE = _CACHE_VARIABLE not in os.environ
if _OWNS_CACHE:
  os.environ[_CACHE_VARIABLE] = tempfile.mkdtemp(prefix="bnjax-test-xla-cache-")
jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_VARIABLE])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.3)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config: pytest.Config) -> None:
  """Removes the run's compilation cache (in the process that created it)."""
  del config
  if _OWNS_CACHE:
    shutil.rmtree(os.environ[_CACHE_VARIABLE], ignore_errors=True)

# A fenced block that starts with "```python" and ends with a line of "```".
_PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def python_blocks(text: str) -> list[tuple[int, str]]:
  """Returns the fenced Python blocks of a Markdown text.

  Args:
    text: the Markdown source.

  Returns:
    `(line, code)` pairs in order, `line` the 0-based line of the block's first code line.
  """
  return [(text.count("\n", 0, match.start(1)), match.group(1))
          for match in _PYTHON_BLOCK.finditer(text)]


class ReadmeBlocks(pytest_doctest.DoctestTextfile):
  """README.md as one doctest per Python block, each with a fresh namespace."""

  def collect(self) -> Iterator[pytest_doctest.DoctestItem]:
    """Yields a doctest item per Python block, named by the block's line."""
    text = self.path.read_text(encoding="utf-8")
    runner = pytest_doctest._get_runner(  # noqa: SLF001  (pytest's runner with its checker)
        verbose=False,
        optionflags=pytest_doctest.get_optionflags(self.config),
        checker=pytest_doctest._get_checker(),  # noqa: SLF001  (supports NUMBER)
        continue_on_failure=False)
    parser = doctest.DocTestParser()
    for line, code in python_blocks(text):
      name = f"{self.path.name}:{line + 1}"
      test = parser.get_doctest(code, {"__name__": "__main__"}, name, str(self.path), line)
      if test.examples:
        yield pytest_doctest.DoctestItem.from_parent(self, name=name, runner=runner, dtest=test)


def pytest_collect_file(parent: pytest.Collector,
                        file_path: pathlib.Path) -> pytest.Collector | None:
  """Collects the repository's README.md block by block."""
  if file_path == README:
    return ReadmeBlocks.from_parent(parent, path=file_path)
  return None


@pytest.fixture(autouse=True)
def _doctest_namespace(request: pytest.FixtureRequest,
                       doctest_namespace: dict[str, object]) -> None:
  """Supplies `bnjax`, `jax`, `jnp` to the library's doctests, nothing to README.md's."""
  import jax.numpy as jnp

  import bnjax

  library_names = {"bnjax": bnjax, "jax": jax, "jnp": jnp}
  for name in library_names:
    doctest_namespace.pop(name, None)
  if request.node.path.is_relative_to(LIBRARY_DIR):
    doctest_namespace.update(library_names)
