"""Command-line words shared by every entry point: `--recipe`, dotted overrides, `--help` text.

Both the `megatron-keye` console script and `python -m megatron_keye.train` (what torchrun
starts on every rank) parse their arguments here, so the two never drift apart.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from functools import cache

from megatron_keye.config.loading import ConfigError
from megatron_keye.config.schema import TrainConfig


def split_recipe_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """`--recipe NAME` (or `--config PATH`) plus dotted `--section.field=value` overrides."""
    recipe, overrides, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--recipe", "--config"):
            if i + 1 >= len(argv):
                raise ConfigError(arg, "needs a value")
            recipe, i = argv[i + 1], i + 2
            continue
        if arg.startswith(("--recipe=", "--config=")):
            recipe = arg.split("=", 1)[1]
        elif arg.startswith("--") and "." in arg.split("=", 1)[0]:
            if "=" not in arg:  # --section.field value
                if i + 1 >= len(argv):
                    raise ConfigError(arg, "needs a value")
                arg, i = f"{arg}={argv[i + 1]}", i + 1
            overrides.append(arg[2:])
        else:
            raise ConfigError(
                arg, "unknown argument; overrides look like --section.field=value (--help lists them)"
            )
        i += 1
    return recipe, overrides


def wants_help(argv: list[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


def config_help(root: type = TrainConfig) -> str:
    """Every config section and field with its type, default and the comment that documents it."""
    lines = []
    for section in dataclasses.fields(root):
        section_type = _resolved_types(root)[section.name]
        if dataclasses.is_dataclass(section_type):
            lines.append(f"\n{section.name}:  {_first_doc_line(section_type)}")
            docs = _field_comments(section_type)
            types = _resolved_types(section_type)
            for f in dataclasses.fields(section_type):
                lines.append(_field_line(f"{section.name}.{f.name}", f, types[f.name],
                                         docs.get(f.name, "")))
        else:
            docs = _field_comments(root)
            lines.append(_field_line(section.name, section, section_type,
                                     docs.get(section.name, "")))
    return "\n".join(lines).lstrip("\n")


def _field_line(name: str, f: dataclasses.Field, tp, doc: str) -> str:
    if f.default is not dataclasses.MISSING:
        default = repr(f.default)
    elif f.default_factory is not dataclasses.MISSING:
        default = repr(f.default_factory())
    else:
        default = "from the model flavor"
    head = f"  --{name}  ({_type_name(tp)}, default {default})"
    if not doc:
        return head
    return head + "\n" + textwrap.fill(doc, width=96, initial_indent="      ",
                                       subsequent_indent="      ")


def _type_name(tp) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    text = getattr(tp, "__name__", None) if typing.get_origin(tp) is None else None
    return text or str(tp).replace("typing.", "")


def _first_doc_line(cls: type) -> str:
    return (inspect.getdoc(cls) or "").split("\n")[0]


@cache
def _resolved_types(cls: type) -> dict:
    return typing.get_type_hints(cls)


@cache
def _field_comments(cls: type) -> dict[str, str]:
    """The `#` comment lines directly above each field of a dataclass, joined into one string."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    docs = {}
    for node in ast.parse(source).body[0].body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        comment, row = [], node.lineno - 2
        while row >= 0 and lines[row].strip().startswith("#"):
            comment.insert(0, lines[row].strip().lstrip("#").strip())
            row -= 1
        trailing = lines[node.lineno - 1].split("  # ", 1)
        if len(trailing) == 2:
            comment.append(trailing[1].strip())
        docs[node.target.id] = " ".join(comment)
    return docs
