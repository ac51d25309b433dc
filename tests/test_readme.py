"""The README's Python blocks: each is collected as a doctest of its own and is self-contained.

The doctests themselves (collected by the root conftest.py, one per block, each in an empty
namespace) prove that every block runs as pasted into a fresh Python. These tests guard the
collection: that no block is silently left out, and, independently of the doctest namespace, that
every name a block reads is imported or assigned in that same block.
"""

import ast
import builtins
import doctest
import pathlib

import conftest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
FENCE = "```python"


def _blocks():
  return conftest.python_blocks(README.read_text(encoding="utf-8"))


def _names(source):
  """Returns the names a piece of code reads and the names it binds, anywhere in it."""
  read, bound = set(), set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Name):
      (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
    elif isinstance(node, ast.alias):
      bound.add(node.asname or node.name.split(".")[0])
    elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
      bound.add(node.name)
    elif isinstance(node, ast.arg):
      bound.add(node.arg)
  return read, bound


def test_every_python_block_of_the_readme_is_collected():
  lines = README.read_text(encoding="utf-8").splitlines()
  fence_lines = [i for i, line in enumerate(lines) if line == FENCE]
  blocks = _blocks()
  assert len(fence_lines) >= 5, "the README is expected to hold its examples as ```python blocks"
  assert [line for line, _ in blocks] == [i + 1 for i in fence_lines]


def test_every_readme_block_is_a_doctest():
  for line, code in _blocks():
    examples = doctest.DocTestParser().get_examples(code)
    assert examples, f"README.md:{line + 1}: a ```python block without `>>>` examples"


def test_every_readme_block_binds_each_name_it_reads():
  for line, code in _blocks():
    source = "\n".join(example.source for example in doctest.DocTestParser().get_examples(code))
    read, bound = _names(source)
    missing = sorted(read - bound - set(dir(builtins)))
    assert not missing, f"README.md:{line + 1}: the block uses {missing} without defining them"
