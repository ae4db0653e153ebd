"""How a bad sweep spec is reported: pydantic's errors in the project's words (the key path, what
was given, what is allowed there), and the YAML loader that refuses a key given twice.

`dkbench.spec.sweep` owns the models; it hands the functions here a `ModelAt` lookup, so the wording
knows which model's fields (allowed keys, bounds) sit at an error's location without importing it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import ValidationError

from .patterns import PATTERN_TYPES

# The model whose fields sit at a location without its last key (() is the root), or None.
ModelAt = Callable[[tuple], Any]


def only_model(model: Any) -> ModelAt:
    """The lookup for errors of one flat model (a provider's options): its fields, at the root."""
    return lambda parent: model if not parent else None


class AxisError(ValueError):
    """A bad axis value; `index` is its place in the list (None when the axis is one value)."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


def show(value: Any) -> str:
    """A value as YAML writes it (`true`, `null`), strings quoted."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if not isinstance(value, (str, int, float, list, dict)):
        return str(value)  # a YAML date, say: 2024-01-01
    return repr(value)


def _format_loc(loc: tuple) -> str:
    return ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")


def validation_message(path: Path, err: ValidationError, model_at: ModelAt) -> str:
    """Every error of a spec that failed validation, one line each under the file's name."""
    lines = [f"{path}: invalid sweep spec"]
    for e in err.errors():
        lines.append(f"  {error_where(e) or '(top level)'}: {error_text(e, model_at)}")
    return "\n".join(lines)


def error_where(e: dict) -> str:
    """The key path a pydantic error blames, e.g. `patterns[0].local_stride.block_size`."""
    if e["type"] == "invalid_key":  # the location is the bad key itself: blame its mapping
        return _format_loc(e["loc"][:-1])
    if e["loc"][-1:] == ("[key]",):  # a mapping's key of the wrong type (`rtol: {1: 0.1}`)
        return _format_loc(e["loc"][:-2])
    error = e.get("ctx", {}).get("error")
    index = (error.index,) if isinstance(error, AxisError) and error.index is not None else ()
    return _format_loc((*e["loc"], *index))


_KINDS = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
          float: "a number", type(None): "null"}
_BOUNDS = {"greater_than": ("gt", "greater than"), "greater_than_equal": ("ge", "greater than or "
           "equal to"), "less_than": ("lt", "less than"), "less_than_equal": ("le", "less than or "
           "equal to"), "multiple_of": ("multiple_of", "a multiple of")}


def error_text(e: dict, model_at: ModelAt) -> str:
    """One pydantic error in the project's words: what was given and what is allowed there.

    ``model_at`` finds the model whose fields sit at a location (see `ModelAt`)."""
    kind, ctx, loc = e["type"], e.get("ctx", {}), e["loc"]
    given, got = show(e.get("input")), _KINDS.get(type(e.get("input")), "something else")
    if kind in ("value_error", "assertion_error"):
        return str(ctx["error"])
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1], model_at)
        return "unknown key" + (f"; allowed keys here: {', '.join(allowed)}" if allowed else "")
    if kind == "union_tag_invalid":
        return f"unknown pattern type {ctx['tag']!r}; pattern types: {', '.join(PATTERN_TYPES)}"
    if kind == "union_tag_not_found":
        return f"no 'type' key; pattern types: {', '.join(PATTERN_TYPES)}"
    if kind == "invalid_key" or (loc[-1:] == ("[key]",) and kind.startswith("string_")):
        return f"the key {given} is not a name; keys are strings"
    if kind == "missing":
        return "required key is missing"
    limits = _limits(loc, model_at)
    if kind.startswith("int_"):
        return f"{given} is not an integer; allowed: integers{limits}"
    if kind.startswith("float_") or kind == "finite_number":
        return f"{given} is not a finite number; allowed: numbers{limits}"
    if kind.startswith("bool_"):
        return f"{given} is not a boolean; allowed: true, false"
    if kind == "string_pattern_mismatch":
        return f"{given} is not allowed; allowed: text matching {ctx['pattern']}"
    if kind == "string_too_long":
        why = " (it starts the run directory's name)" if loc == ("name",) else ""
        return f"{len(e['input'])} characters; allowed: at most {ctx['max_length']}{why}"
    if kind.startswith("string_"):
        return f"{given} is not a string"
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", ctx["expected"])  # "'auto', 'cuda' or 'cpu'"
        return f"{given} is not allowed; allowed: {', '.join(choices) or ctx['expected']}"
    if kind in _BOUNDS:
        bound, words = _BOUNDS[kind]
        return f"must be {words} {ctx[bound]}, got {given}"
    if kind in ("list_type", "tuple_type"):
        return f"expected a list, got {got}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"expected a mapping of keys, got {got}"
    if kind in ("too_short", "too_long"):
        n, most = ctx["actual_length"], kind == "too_long"
        want = f"at {'most' if most else 'least'} {ctx['max_length' if most else 'min_length']}"
        return f"{'an empty list' if n == 0 else f'{n} items'}; give {want}"
    return e["msg"]


def _allowed_keys(parent: tuple, model_at: ModelAt) -> list[str]:
    model = model_at(parent)
    return sorted(model.model_fields) if model is not None else []


def _limits(loc: tuple, model_at: ModelAt) -> str:
    """The bounds of the field at ``loc``, e.g. `` > 0``, or nothing."""
    model = model_at(loc[:-1])
    field = model.model_fields.get(str(loc[-1])) if model is not None and loc else None
    signs = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    return " and".join(f" {signs[k]} {getattr(m, k)}" for m in (field.metadata if field else ())
                       for k in signs if hasattr(m, k))


# -- YAML --

class DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int) -> None:
        super().__init__(f"duplicate key {key!r} on line {line}")
        self.key, self.line, self.first = key, line, first


class SpecLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """yaml's safe loader (libyaml's when there), refusing a key given twice in one mapping
    (plain YAML keeps the last one silently, so `seqlen` twice would run only the second)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` then a key of base: an override, as YAML means it
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in first:
                    raise DuplicateKey(key, line, first[key])
                first[key] = line
            except TypeError:
                pass  # an unhashable key: the base constructor says so
        return super().construct_mapping(node, deep)


def yaml_problem(exc: yaml.MarkedYAMLError) -> str:
    """`line 3, column 6: did not find ... (while parsing a flow sequence, line 2)`."""
    mark, context = exc.problem_mark, exc.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    around = f" ({exc.context}, line {context.line + 1})" if exc.context and context else ""
    return f"{where}{exc.problem or exc.context}{around}"
