"""Sphinx configuration of the lightning_mem documentation site.

Build: ``python -m sphinx -W -n -b html docs build/docs`` (warnings are errors; every cross-reference must resolve).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from importlib.metadata import version as _version
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

import lightning_mem

project = "lightning_mem"
author = "lightning_mem contributors"
copyright = "2025-2026, lightning_mem contributors"
release = _version("lightning_mem")
version = release

extensions = [
    "myst_parser",  # the guide pages are Markdown, readable on GitHub as they are
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # the docstrings are Google style
    "sphinx.ext.mathjax",  # their ``.. math::`` blocks and the pages' $...$
    "sphinx-mathjax-offline",  # with MathJax in the site itself: it reads without a network
    "sphinx.ext.viewcode",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"lightning_mem {release}"

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_inherit_docstrings = False  # torch's and Lightning's own docstrings are theirs to publish
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_custom_sections = [("References", "notes_style")]

# Every cross-reference into this package must resolve, so a broken `:func:` in a docstring fails the build. The
# packages we build on are not linked (intersphinx would need the network while building) and private names are
# shown as code.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|lightning|torchmetrics|matplotlib|numpy|np|nn|FrEIA|zuko|normflows|collections|typing|pathlib)\..*"),
    (r"py:.*", r"(Tensor|Trainer|LightningModule|Metric|Callback|Logger|DataLoader|Path|Callable|Iterator|Iterable)"),
    (r"py:.*", r"(Sequence|Mapping|Any|Literal|NamedTuple|MisconfigurationException)"),
    (r"py:.*", r"(.*\.)?_[A-Za-z].*"),
]


# ---------------------------------------------------------------- the public objects, each documented once
#
# An object is documented at its *home*: for a class or function, the shortest public module path that exports it in
# `__all__` (``lightning_mem.decoder_jacobian``, not ``lightning_mem.jacobian.decoder_jacobian``); for a constant, the
# module whose source documents it. A reference to any other name of the same object resolves to that page.

_FIRST_MODULES = ("lightning_mem", "lightning_mem.functional", "lightning_mem.metrics")


def _public_modules() -> list[Any]:
    names = [m.name for m in pkgutil.walk_packages(lightning_mem.__path__, "lightning_mem.")]
    names = [*_FIRST_MODULES, *sorted(set(names) - set(_FIRST_MODULES))]
    return [importlib.import_module(name) for name in names if not any(part.startswith("_") for part in name.split("."))]


def _documents_attribute(module: Any, name: str) -> bool:
    try:
        return ("", name) in ModuleAnalyzer.for_module(module.__name__).find_attr_docs()
    except Exception:  # no source (an extension module)
        return False


def _homes() -> dict[str, list[str]]:
    """Module name -> the public names documented there, in ``__all__`` order."""
    homes: dict[int, tuple[str, str]] = {}
    for module in _public_modules():
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            if name.startswith("__") or inspect.ismodule(obj):
                continue
            routine_or_class = inspect.isclass(obj) or inspect.isroutine(obj)
            if id(obj) not in homes if routine_or_class else _documents_attribute(module, name):
                homes[id(obj)] = (module.__name__, name)
    result: dict[str, list[str]] = {}
    for module_name, name in homes.values():
        result.setdefault(module_name, []).append(name)
    return result


class PackageReference(SphinxDirective):
    """``.. package-reference::``: one section per public module, each public object at its home."""

    def run(self) -> list[nodes.Node]:
        self.env.note_reread()  # the package changes without this page changing
        homes = _homes()
        lines: list[str] = []
        for module in _public_modules():
            title = f"``{module.__name__}``"
            lines += [title, "-" * len(title), "", f".. automodule:: {module.__name__}", "   :no-members:", ""]
            for name in homes.get(module.__name__, []):
                obj = getattr(module, name)
                kind = "autoclass" if inspect.isclass(obj) else "autofunction" if inspect.isroutine(obj) else "autodata"
                options = ["   :members:", "   :inherited-members:"] if kind == "autoclass" else []
                lines += [f".. {kind}:: {module.__name__}.{name}", *options, ""]
        container = nodes.section()
        container.document = self.state.document
        nested_parse_with_titles(self.state, StringList(lines, source="package-reference"), container)
        return container.children


def _skip_foreign_members(app: Any, what: str, name: str, obj: Any, skip: bool, options: Any) -> bool | None:
    # `:inherited-members:` shows what a class inherits from this package's private bases (``Metric.diagnostics``),
    # not the methods of torch.nn.Module, torchmetrics.Metric or Lightning's classes
    function = obj.fget if isinstance(obj, property) else obj
    module = getattr(function, "__module__", None)
    if what == "class" and callable(function) and not (module or "").startswith("lightning_mem"):
        return True
    return None


def _import(path: str) -> Any:
    """The object at a dotted path (module, then attributes), or ``None``."""
    parts = path.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for attribute in parts[split:]:
                obj = getattr(obj, attribute)
        except AttributeError:
            return None
        return obj
    return None


def _documented(env: Any) -> dict[int, str]:
    """``id(object) -> documented name`` of every object of the Python domain."""
    objects = env.domains["py"].objects
    cache = getattr(env, "_lightning_mem_documented", None)
    if cache is None or cache[0] != len(objects):
        mapping: dict[int, str] = {}
        for name in objects:
            obj = _import(name)
            if obj is not None:
                mapping.setdefault(id(obj), name)
        cache = (len(objects), mapping)
        env._lightning_mem_documented = cache
    return cache[1]


def _candidates(node: Any) -> list[str]:
    """Full names a reference may mean: as written; relative to its docstring's class, module or defining module; or,
    for a bare name, the one public object of that name."""
    target = node["reftarget"].lstrip("~.")
    module, cls = node.get("py:module"), node.get("py:class")
    candidates = [target]
    if module:
        candidates += [f"{module}.{cls}.{target}"] if cls else []
        candidates.append(f"{module}.{target}")
        context = _import(f"{module}.{cls}" if cls else module)
        if context is not None and not inspect.ismodule(context):  # a docstring written in another module
            candidates.append(f"{context.__module__}.{target}")
    if "." not in target:
        found = {id(obj): f"{m.__name__}.{target}" for m in _public_modules() if (obj := getattr(m, target, None)) is not None}
        if len(found) == 1 and not inspect.ismodule(_import(next(iter(found.values())))):
            candidates.extend(found.values())
    return candidates


def _resolve_other_name(app: Any, env: Any, node: Any, contnode: Any) -> Any:
    if node.get("refdomain") != "py":
        return None
    objects, documented = env.domains["py"].objects, _documented(env)
    for candidate in _candidates(node):
        obj = _import(candidate)
        name = candidate if candidate in objects else documented.get(id(obj)) if obj is not None else None
        if name is not None:
            return env.domains["py"].resolve_xref(env, node["refdoc"], app.builder, node["reftype"], name, node, contnode)
        if obj is not None and candidate.startswith("lightning_mem.") and not (inspect.isclass(obj) or inspect.isroutine(obj)):
            return contnode  # a type alias of this package (``JacobianMode``): shown as code
    return None


def _check_every_public_object_is_documented(app: Any, env: Any) -> None:
    documented, objects = _documented(env), env.domains["py"].objects
    for module in _public_modules():
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            path = f"{module.__name__}.{name}"
            if not name.startswith("__") and not inspect.ismodule(obj) and path not in objects and id(obj) not in documented:
                logging.getLogger(__name__).warning(
                    "public object %s is not in the API reference (a constant needs a docstring where it is defined)", path
                )


_PROSE_DOCSTRINGS: dict[str, list[str]] = {}


def _hide_from_napoleon(app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    # napoleon reads a constant's docstring as "type: description"; ours are prose ("Active-latent threshold: ...")
    if what in {"data", "attribute"}:
        _PROSE_DOCSTRINGS[name], lines[:] = list(lines), []


def _restore_after_napoleon(app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    if name in _PROSE_DOCSTRINGS:
        lines[:] = _PROSE_DOCSTRINGS.pop(name)


def setup(app: Any) -> None:
    app.add_directive("package-reference", PackageReference)
    app.connect("autodoc-skip-member", _skip_foreign_members)
    app.connect("autodoc-process-docstring", _hide_from_napoleon, priority=100)
    app.connect("autodoc-process-docstring", _restore_after_napoleon, priority=900)
    app.connect("missing-reference", _resolve_other_name, priority=900)
    app.connect("env-check-consistency", _check_every_public_object_is_documented)
