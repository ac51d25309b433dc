"""Packaging: one version, the declared license, type information, and a test extra that suffices.

`pip install -e '.[test]' && pytest` must work in a fresh environment, so every third-party module
that the suite imports (tests, docstrings, README blocks, the example and the benchmark modules the
tests use) has to come from a distribution that the `test` extra requires, directly or through the
extras it names.
"""

import ast
import doctest
import importlib.metadata
import pathlib
import re
import sys
import tomllib

import bnjax
import conftest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
FIRST_PARTY = {"bnjax", "bnjax_examples", "tests", "configs", "benchmarks", "conftest"}


def _normalize(name):
  return re.sub(r"[-_.]+", "-", name).lower()


def _extra_requirements(extra):
  """Distribution names that `pip install 'bnjax[extra]'` asks for, following `bnjax[...]`."""
  project = PYPROJECT["project"]
  wanted, seen, extras = set(), set(), [extra]
  for requirement in project["dependencies"]:
    wanted.add(_normalize(re.match(r"[A-Za-z0-9._-]+", requirement).group()))
  while extras:
    name = extras.pop()
    if name in seen:
      continue
    seen.add(name)
    for requirement in project["optional-dependencies"][name]:
      match = re.match(r"([A-Za-z0-9._-]+)(?:\[([^\]]+)\])?", requirement)
      if _normalize(match.group(1)) == "bnjax":
        extras.extend(e.strip() for e in match.group(2).split(","))
      else:
        wanted.add(_normalize(match.group(1)))
  return wanted


def _imports(source, deferred_optional=False):
  """Top-level modules imported by code, except inside `try: ... except ImportError`.

  With `deferred_optional`, imports inside function bodies are left out too: a benchmark module's
  optional peers are imported only by the builders that need them, which the suite never calls.
  """
  tree = ast.parse(source)
  optional = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Try) and any(
        isinstance(h.type, ast.Name) and h.type.id in {"ImportError", "ModuleNotFoundError"}
        for h in node.handlers):
      optional.update(id(n) for statement in node.body for n in ast.walk(statement))
    if deferred_optional and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      optional.update(id(n) for statement in node.body for n in ast.walk(statement))
  modules = set()
  for node in ast.walk(tree):
    if id(node) in optional:
      continue
    if isinstance(node, ast.Import):
      modules.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      modules.add(node.module)
      modules.update(f"{node.module}.{alias.name}" for alias in node.names)
  return modules


def _module_file(dotted):
  """The file of a first-party module, or None."""
  path = ROOT.joinpath(*dotted.split("."))
  for candidate in (path.with_suffix(".py"), path / "__init__.py"):
    if candidate.is_file():
      return candidate
  return None


def _suite_imports():
  """Third-party top-level modules the suite imports, with a file that imports each."""
  readme = (ROOT / "README.md").read_text(encoding="utf-8")
  sources = {f"README.md:{line + 1}": "\n".join(
      e.source for e in doctest.DocTestParser().get_examples(code))
             for line, code in conftest.python_blocks(readme)}
  queue = [ROOT / "conftest.py"]
  for folder in ("tests", "bnjax", "bnjax_examples", "configs"):
    queue.extend(sorted((ROOT / folder).rglob("*.py")))
  seen, third_party = set(), {}
  while queue or sources:
    if sources:
      where, source = sources.popitem()
    else:
      path = queue.pop()
      if path in seen:
        continue
      seen.add(path)
      where, source = str(path.relative_to(ROOT)), path.read_text(encoding="utf-8")
    for module in _imports(source, deferred_optional=where.startswith("benchmarks/")):
      top = module.split(".")[0]
      if top in FIRST_PARTY:
        module_file = _module_file(module)
        if module_file is not None:  # benchmark modules count only as far as the suite uses them
          queue.append(module_file)
      elif top not in sys.stdlib_module_names:
        third_party.setdefault(top, where)
  return third_party


def test_version_is_written_once_in_the_package():
  assert "version" not in PYPROJECT["project"]
  assert "version" in PYPROJECT["project"]["dynamic"]
  assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "bnjax.__version__"}
  assert re.fullmatch(r"\d+\.\d+\.\d+", bnjax.__version__)


def test_installed_metadata_reports_the_package_version():
  assert importlib.metadata.version("bnjax") == bnjax.__version__


def test_changelog_has_unreleased_and_the_current_version():
  changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
  headings = re.findall(r"^## \[([^\]]+)\]", changelog, flags=re.MULTILINE)
  assert headings[:1] == ["Unreleased"]
  assert bnjax.__version__ in headings
  assert re.search(rf"^## \[{re.escape(bnjax.__version__)}\] - \d{{4}}-\d{{2}}-\d{{2}}$",
                   changelog, flags=re.MULTILINE)
  for heading in headings:
    assert re.search(rf"^\[{re.escape(heading)}\]: https://", changelog, flags=re.MULTILINE)


def test_license_file_is_the_apache_2_text_the_metadata_declares():
  assert PYPROJECT["project"]["license"] == "Apache-2.0"
  assert PYPROJECT["project"]["license-files"] == ["LICENSE"]
  text = (ROOT / "LICENSE").read_text(encoding="utf-8")
  assert text.split()[:5] == ["Apache", "License", "Version", "2.0,", "January"]
  assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
  assert "END OF TERMS AND CONDITIONS" in text


def test_package_ships_type_information():
  assert (ROOT / "bnjax" / "py.typed").is_file()
  assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["bnjax"]


def test_test_extra_provides_every_module_the_suite_imports():
  required = _extra_requirements("test")
  distributions = importlib.metadata.packages_distributions()
  missing = []
  for module, where in sorted(_suite_imports().items()):
    providers = {_normalize(d) for d in distributions.get(module, ())}
    if not providers & required:
      missing.append(f"{module} (imported by {where}; installed from {sorted(providers)})")
  assert not missing, "add to the `test` extra of pyproject.toml: " + "; ".join(missing)
