"""The example's package name is unambiguous: it is this repository's, no installed distribution
provides a module of that name (dm-haiku installs a top-level ``examples``), and bnjax's own
distribution leaves the example out."""

import fnmatch
import importlib.metadata
import pathlib
import tomllib

import bnjax_examples

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_example_package_is_the_repositorys():
  assert pathlib.Path(bnjax_examples.__file__).resolve().parent == REPO_ROOT / "bnjax_examples"


def test_no_installed_distribution_provides_the_example_package():
  assert bnjax_examples.__name__ not in importlib.metadata.packages_distributions()


def test_bnjax_distribution_includes_bnjax_and_not_the_example():
  pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
  include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
  # setuptools keeps a package whose dotted name matches one of the include patterns (fnmatch).
  packaged = lambda name: any(fnmatch.fnmatchcase(name, pattern) for pattern in include)
  assert packaged("bnjax") and packaged("bnjax.submodule")
  for top_level in ("bnjax_examples", "configs", "benchmarks", "tests"):
    assert not packaged(top_level) and not packaged(f"{top_level}.module"), top_level
