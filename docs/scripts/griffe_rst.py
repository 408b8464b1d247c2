"""A Griffe extension: the reST bits of the docstrings, rendered by the Markdown site.

The library's docstrings are Google style with a few reStructuredText constructs that read
well in ``help()`` and in editors. Before mkdocstrings renders them this extension turns

* ``.. math::`` blocks (and ``.. math:: formula`` one-liners) into ``$$ … $$`` blocks,
* reST "simple tables" (columns under ``=====  =====`` borders) into Markdown tables,
* ``:math:`x``` into ``$x$``,
* ``:mod:`` / ``:class:`` / ``:func:`` / ``:meth:`` / ``:attr:`` roles into links to the API
  page of the object (``~`` shows the last name only), or into plain code when the name is
  not part of the documented packages.

It runs once the whole package is loaded, so a short name resolves against the module it
appears in, then against the package's top level (``mac_ref.MACConfig``).
"""

from __future__ import annotations

import re
import textwrap

import griffe

_ROLE = re.compile(r":(mod|class|func|meth|attr|obj):`(~?)([\w.]+)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_MATH_DIRECTIVE = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<first>.*)$")


def convert_math_blocks(text: str) -> str:
    """``.. math::`` directives -> ``$$`` blocks (content = the directive's indented lines)."""
    lines = text.split("\n")
    out, i = [], 0
    while i < len(lines):
        m = _MATH_DIRECTIVE.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        indent = len(m.group("indent"))
        body = [m.group("first")] if m.group("first").strip() else []
        i += 1
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
            body.append(lines[i])
            i += 1
        formula = textwrap.dedent("\n".join(b for b in body if b.strip())) if body else ""
        formula = "\n".join(line.strip() for line in formula.split("\n"))
        pad = " " * indent
        out += ["", f"{pad}$$", *(pad + line for line in formula.split("\n")), f"{pad}$$", ""]
    return "\n".join(out)


_BORDER = re.compile(r"^[ \t]*=+(?: +=+)+[ \t]*$")


def convert_simple_tables(text: str) -> str:
    """reST simple tables (border, header, border, rows, border) -> Markdown tables."""
    lines = text.split("\n")
    out, i = [], 0
    while i < len(lines):
        borders = [j for j in range(i, min(len(lines), i + 200)) if _BORDER.match(lines[j])][:3]
        if not borders or borders[0] != i or len(borders) < 3:
            out.append(lines[i])
            i += 1
            continue
        top, mid, bottom = borders
        starts = [m.start() for m in re.finditer(r"=+", lines[top])]

        def cells(line: str) -> list[str]:
            bounds = starts[1:] + [None]
            return [line[a:b].strip().replace("|", "\\|") for a, b in zip(starts, bounds)]

        header = [" ".join(col) for col in zip(*(cells(line) for line in lines[top + 1 : mid]))]
        out += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        rows: list[list[str]] = []
        for line in lines[mid + 1 : bottom]:
            if not line.strip():
                continue
            row = cells(line)
            if rows and not row[0]:  # a blank first column continues the row above
                rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], row)]
            else:
                rows.append(row)
        out += ["| " + " | ".join(row) + " |" for row in rows]
        out.append("")
        i = bottom + 1
    return "\n".join(out)


class RstToMarkdown(griffe.Extension):
    """Rewrite docstrings of every object of a loaded package (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        for obj in _walk(pkg):
            if obj.docstring is not None:
                obj.docstring.value = self._convert(obj.docstring.value, obj, pkg)

    def _convert(self, text: str, obj: griffe.Object, pkg: griffe.Module) -> str:
        text = convert_simple_tables(convert_math_blocks(text))
        text = _MATH_ROLE.sub(lambda m: f"${m.group(1)}$", text)
        return _ROLE.sub(lambda m: self._link(m, obj, pkg), text)

    @staticmethod
    def _link(m: re.Match, obj: griffe.Object, pkg: griffe.Module) -> str:
        _, tilde, name = m.groups()
        label = name.rsplit(".", 1)[-1] if tilde else name
        module = obj if obj.is_module else obj.module
        for candidate in (name, f"{module.path}.{name}", f"{pkg.path}.{name}"):
            target = _canonical(pkg, candidate)
            if target:
                return f"[`{label}`][{target}]"
        return f"`{label}`"


def _canonical(pkg: griffe.Module, path: str) -> str | None:
    """Where ``path`` is documented (aliases followed), or ``None`` if it is not."""
    if path != pkg.path and not path.startswith(pkg.path + "."):
        return None
    try:
        target = pkg[path[len(pkg.path) + 1 :]] if path != pkg.path else pkg
        if target.is_alias:
            target = target.final_target
    except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None
    # names starting with _ are not rendered, so a link to them would dangle
    if any(part.startswith("_") for part in target.path.split(".")):
        return None
    return target.path


def _walk(obj: griffe.Object):
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)
