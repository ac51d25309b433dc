"""Sphinx configuration: the API reference, generated from the docstrings.

Build it with `make docs` (warnings are errors); the pages land in `docs/_build/html/`.
The public modules are listed in `api.rst`: adding a module there is one line.
"""

import inspect
import pathlib
import sys

# Document this checkout, whether or not bnjax is installed.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import bnjax

project = "bnjax"
author = "The bnjax authors"
copyright = "The bnjax authors"  # noqa: A001  (the name Sphinx reads)
version = release = bnjax.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "_autosummary/*.tmp"]

# One page per module listed in api.rst, written to _autosummary/ on every build.
autosummary_generate = True
autosummary_generate_overwrite = True
autosummary_imported_members = False

autodoc_default_options = {
    "members": True,
    "member-order": "bysource",
    "special-members": "__call__",
    "show-inheritance": True,
}
# Signatures show the annotations; the Args sections say what each argument means.
autodoc_typehints = "signature"
autodoc_preserve_defaults = True

# Google-style docstrings.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# A class's `Attributes:` section becomes a field list, not a second description of each field.
napoleon_use_ivar = True

default_role = "code"
html_theme = "alabaster"
html_title = f"bnjax {release}"


def _skip_borrowed_docstrings(app, what, name, obj, skip, options):  # noqa: ARG001  (Sphinx's signature)
  """Leaves out class attributes whose only docstring is that of their value.

  A module's field default (`param_dtype = jnp.float32`, `bias_init = initializers.zeros`) would
  otherwise be documented with the docstring of `jnp.float32` or of the initializer; the class's
  `Attributes:` section describes the field instead.
  """
  if what == "class" and (inspect.isroutine(obj) or isinstance(obj, type)):
    defined_in = getattr(obj, "__module__", None) or ""
    if defined_in.split(".")[0] != "bnjax":
      return True
  return None


def setup(app):
  """Registers the hook above."""
  app.connect("autodoc-skip-member", _skip_borrowed_docstrings)
