"""The job-spec reference in docs/spec.md, generated from the pydantic model so it cannot drift.

Field names, types, bounds, defaults and meanings (``Field(description=...)``) come from ``JobSpec``
itself. A test fails when the copy in docs/spec.md differs from ``reference_markdown()`` or when a field
has no description; refresh with ``python -m raptor.service.spec.reference --update``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Iterator, Literal

import annotated_types as at
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from raptor.service.spec import JobSpec

BEGIN, END = "<!-- spec-reference:begin -->", "<!-- spec-reference:end -->"
DOCS_FILE = Path("docs/spec.md")  # where the reference lives, relative to the repository root

_BOUNDS = ((at.Gt, "gt", ">"), (at.Ge, "ge", ">="), (at.Lt, "lt", "<"), (at.Le, "le", "<="))


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``X`` or ``X | None``, if any (a ``dict[str, X]`` is a field, not a section)."""
    if typing.get_origin(annotation) is dict:
        return None
    for t in (annotation, *typing.get_args(annotation)):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " \\| ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return "any" if annotation is Any else annotation.__name__


def _type(field: FieldInfo) -> str:
    bounds = [f"{sym} {getattr(m, attr)}" for m in field.metadata for cls, attr, sym in _BOUNDS if isinstance(m, cls)]
    return " ".join([_type_name(field.annotation), *bounds])


def _short(value: Any) -> Any:
    """Floats to four significant digits (1/3 reads as 0.3333), inside lists and dicts too."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, list):
        return [_short(v) for v in value]
    if isinstance(value, dict):
        return {k: _short(v) for k, v in value.items()}
    return value


def _value(value: Any) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return f"`{json.dumps(_short(value))}`"


def _rows(model: type[BaseModel], defaults: BaseModel | None, prefix: str = "") -> Iterator[tuple[str, str, str, str]]:
    """(field, type, default, meaning) for every leaf of ``model``; nested sections become dotted names."""
    for name, field in model.model_fields.items():
        if field.is_required():
            default = "required"
        elif defaults is not None:
            default = _value(getattr(defaults, name))
        else:
            default = _value(field.get_default(call_default_factory=True))
        sub = _section_model(field.annotation)
        if sub is None:
            yield f"{prefix}{name}", _type(field), default, field.description or ""
            continue
        if type(None) in typing.get_args(field.annotation):  # an optional sub-section: say so, then list what it holds
            yield f"{prefix}{name}", "section \\| null", default, field.description or (sub.__doc__ or "").split("\n")[0]
        nested = getattr(defaults, name) if defaults is not None else field.get_default(call_default_factory=True)
        yield from _rows(sub, nested if isinstance(nested, sub) else None, f"{prefix}{name}.")


def reference_markdown() -> str:
    """The reference: the top-level fields, then one table per section, in the order a spec lists them."""
    rows = list(_rows(JobSpec, None))
    header = ["| field | type | default | meaning |", "|---|---|---|---|"]

    def table(prefix: str) -> list[str]:
        return [f"| `{n.removeprefix(prefix)}` | {t} | {d} | {m} |" for n, t, d, m in rows if (n.startswith(prefix) if prefix else "." not in n)]

    out = [BEGIN, "", *header, *table("")]
    for name, field in JobSpec.model_fields.items():
        sub = _section_model(field.annotation)
        if sub is None:
            continue
        doc = (sub.__doc__ or "").strip().split("\n")[0]
        status = "required section" if field.is_required() else "optional section"
        out += ["", f"**`{name}`** ({status}){': ' + doc if doc else ''}", "", *header, *table(f"{name}.")]
    return "\n".join([*out, "", END])


def undocumented() -> list[str]:
    """Fields without a description (the test names them)."""
    return [name for name, _, _, meaning in _rows(JobSpec, None) if not meaning]


def replace_block(text: str) -> str:
    """``text`` with the block between the markers replaced by the current reference."""
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"no {BEGIN} ... {END} block to replace (the reference lives in {DOCS_FILE.as_posix()})")
    return pattern.sub(lambda _: reference_markdown(), text, count=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print the job-spec reference, or refresh it in a Markdown file.")
    parser.add_argument("--update", metavar="FILE", nargs="?", const=str(DOCS_FILE),
                        help=f"replace the reference block in FILE (default {DOCS_FILE.as_posix()})")
    args = parser.parse_args(argv)
    if args.update:
        path = Path(args.update)
        path.write_text(replace_block(path.read_text()))
    else:
        sys.stdout.write(reference_markdown() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
