"""The machine a run measured: CPU, cores, allocator, library versions, bnjax's revision."""

import glob
import hashlib
import os
import platform
import subprocess

from benchmarks import names

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERSIONED_MODULES = ("jax", "jaxlib", "flax", "haiku", "equinox", "numpy", "torch", "matplotlib")
TCMALLOC_PATTERNS = ("/usr/lib/*/libtcmalloc_minimal.so.4", "/usr/lib/libtcmalloc_minimal.so.4",
                     "/usr/lib/*/libtcmalloc_minimal.so*", "/usr/lib/*/libtcmalloc.so.4")


def _first_line(error: BaseException) -> str:
  return f"{type(error).__name__}: {error}".splitlines()[0]


def versions(modules=VERSIONED_MODULES) -> dict[str, str]:
  """{module: version} for Python and `modules` (or why one does not import)."""
  found = {"python": platform.python_version()}
  for module in modules:
    try:
      found[module] = __import__(module).__version__
    except Exception as error:  # noqa: BLE001  (any import failure is reported, not raised)
      found[module] = f"not importable ({_first_line(error)})"
  return found


def importable(modules=tuple(names.OPTIONAL_MODULES)) -> dict[str, str | None]:
  """{module: None if it imports, else the reason}; only `modules` are tried."""
  peers = {}
  for module in modules:
    try:
      __import__(module)
      peers[module] = None
    except Exception as error:  # noqa: BLE001
      peers[module] = _first_line(error)
  return peers


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def cores() -> int:
  """The cores this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def allocator_in_use() -> str:
  """"tcmalloc" when it is mapped into this process (LD_PRELOAD), else "glibc"."""
  try:
    with open("/proc/self/maps") as f:
      maps = f.read()
  except OSError:
    return "unknown"
  return "tcmalloc" if "tcmalloc" in maps else "glibc"


def tcmalloc_path() -> str | None:
  """The tcmalloc shared library to preload, if the system has one."""
  for pattern in TCMALLOC_PATTERNS:
    found = sorted(glob.glob(pattern))
    if found:
      return found[0]
  return None


def git_revision() -> str:
  try:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                          text=True, timeout=10).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return head + (" (with uncommitted changes)" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def source_digest() -> str:
  """A short hash of bnjax's sources, to tell whether the library changed during a run."""
  digest = hashlib.sha256()
  for path in sorted(glob.glob(os.path.join(REPO, "bnjax", "*.py"))):
    with open(path, "rb") as f:
      digest.update(f.read())
  return digest.hexdigest()[:12]


def torch_threads(count: int) -> int | None:
  """Gives PyTorch `count` threads (as many as XLA:CPU uses); None if torch does not import."""
  try:
    import torch  # pylint: disable=import-outside-toplevel  (optional peer)
  except ImportError:
    return None
  torch.set_num_threads(count)
  return torch.get_num_threads()


def describe() -> dict[str, object]:
  """The "machine" entry of a run: CPU, cores, OS and the environment that changes timings."""
  return {"cpu": cpu_model(), "cores": cores(), "os": platform.platform(),
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
          "ld_preload": os.environ.get("LD_PRELOAD", "")}
