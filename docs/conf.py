"""Sphinx configuration for the losses documentation (`make docs`, warnings are errors)."""

import losses

project = "losses"
author = "the losses authors"
release = losses.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",  # performance.md is written by `make bench`
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}
# losses.lightning imports Lightning, which the docs extra does not install.
autodoc_mock_imports = ["lightning"]
napoleon_google_docstring = True
napoleon_numpy_docstring = False
nitpicky = False
exclude_patterns = ["_build"]
html_theme = "alabaster"
