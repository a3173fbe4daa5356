"""Griffe extensions for the API reference: what the sources say that griffe alone misses.

`higher` spans five distributions, and higher-core's `higher/__init__.py` starts by extending
`__path__` (`pkgutil.extend_path`) so that the siblings' subpackages import. Griffe reads such a
package as a bare namespace (its submodules, found in every source folder) and skips the body of
that `__init__.py`: the reference showed no `innerloop_ctx`, no `Recompute`, no `UnrollError`.
Python runs that body; this extension reads it too, and gives the namespace its docstring (set
as `__doc__ = ...`, since the first statement must be the `__path__` line), its members and its
`__all__`. A submodule wins over an import of the same name (`from higher import patch as patch`).

Two more: a data constant documented by a `#:` comment above it (the convention of the sources)
gets that comment as its docstring, and a private base class is shown as its own bases (the
reader of `FunctionalModule` sees `torch.nn.Module`, not `_FunctionalNode`).
"""

from __future__ import annotations

import ast
from typing import Any

import griffe


class PkgutilNamespaceInit(griffe.Extension):
    """Load the body of a pkgutil-style namespace package's `__init__.py` into the package."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if not isinstance(pkg.filepath, list):  # a regular package: griffe read its __init__
            return
        inits = [folder / "__init__.py" for folder in pkg.filepath]
        init = next((path for path in inits if path.is_file()), None)
        if init is None:  # a native (PEP 420) namespace: there is no body to read
            return
        body = griffe.visit(
            pkg.name,
            filepath=init,
            code=init.read_text(encoding="utf-8"),
            docstring_parser=loader.docstring_parser,
            docstring_options=loader.docstring_options,
            lines_collection=loader.lines_collection,
            modules_collection=loader.modules_collection,
        )
        for name, member in list(body.members.items()):
            if name == "__doc__" and isinstance(member, griffe.Attribute) and member.value:
                pkg.docstring = griffe.Docstring(
                    ast.literal_eval(str(member.value)),
                    lineno=member.lineno,
                    parent=pkg,
                    parser=loader.docstring_parser,
                    parser_options=loader.docstring_options,
                )
                continue
            existing = pkg.members.get(name)
            if existing is not None and existing.is_module:
                continue
            pkg.set_member(name, member)
        pkg.imports.update(body.imports)
        pkg.exports = body.exports
        loader.expand_exports(pkg)


class CommentDocstrings(griffe.Extension):
    """A `#:` comment block right above an assignment is the docstring of what it assigns."""

    def on_attribute(
        self, *, attr: griffe.Attribute, loader: griffe.GriffeLoader, **kwargs: Any
    ) -> None:
        if attr.docstring is not None or attr.lineno is None or isinstance(attr.filepath, list):
            return
        lines = attr.filepath.read_text(encoding="utf-8").splitlines()
        above = attr.lineno - 2  # the line before the assignment, 0-based
        comment: list[str] = []
        while above >= 0 and lines[above].lstrip().startswith("#:"):
            comment.insert(0, lines[above].lstrip()[2:].strip())
            above -= 1
        if comment:
            attr.docstring = griffe.Docstring(
                " ".join(comment),
                lineno=above + 2,
                parent=attr,
                parser=loader.docstring_parser,
                parser_options=loader.docstring_options,
            )


class PublicBases(griffe.Extension):
    """Show a private base class as its own bases, so no private name heads a public class."""

    def on_class(self, *, cls: griffe.Class, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        cls.bases = _public_bases(cls.bases, loader)


def _public_bases(bases: list[str | griffe.Expr], loader: griffe.GriffeLoader) -> list[Any]:
    public: list[Any] = []
    for base in bases:
        path = base.canonical_path if isinstance(base, griffe.Expr) else base
        if not path.rsplit(".", 1)[-1].startswith("_"):
            public.append(base)
            continue
        try:
            target = loader.modules_collection.get_member(path)
        except KeyError:  # not loaded: keep the name rather than lose the base
            public.append(base)
            continue
        public.extend(_public_bases(target.bases, loader))
    return public
