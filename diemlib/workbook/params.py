r"""A notebook's parameters: declared in its `parameters` cell, read with `ast`, validated.

See [`diemlib.workbook.runner`][] for the declaration syntax (`name = default  # help (> 0)`)
and the resolution order (defaults, params file, `-p` overrides).
"""

from __future__ import annotations

import ast
import difflib
import io
import re
import tokenize
from dataclasses import dataclass
from typing import Any

import yaml

RESERVED = ("out_dir",)  # parameters the runner sets itself


class RunnerError(Exception):
    """Bad input to the runner (unknown notebook, params file, parameter or value)."""


# --------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-3` as a float and refuses duplicate keys."""


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:float"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _construct_mapping(loader, node, deep=False):
    keys = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in keys:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        keys.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def yaml_value(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class Parameter:
    """One knob of a notebook, as declared in its `parameters` cell.

    **Arguments:**

    - `name`, `default`: the assignment `name = default`.
    - `help`: the trailing comment, constraint included.
    - `bounds`: `(op, number)` pairs that must all hold; `choices`: allowed values (or `None`).
    """

    name: str
    default: Any
    help: str = ""
    bounds: tuple[tuple[str, float], ...] = ()
    choices: tuple[Any, ...] | None = None

    @property
    def type(self) -> type | None:
        """The expected type (`None`: anything), derived from the default."""
        d = self.default
        if d is None:
            return None
        if isinstance(d, tuple):
            return list
        return type(d)

    @property
    def item_type(self) -> type | None:
        """For a list, the type of its elements (`None`: unchecked)."""
        if self.type is not list or not self.default:
            return None
        types = {type(x) for x in self.default}
        if types == {int, float}:
            return float
        return types.pop() if len(types) == 1 else None

    @property
    def type_name(self) -> str:
        t = self.type
        if t is None:
            return "any"
        if t is list:
            it = self.item_type
            return f"list[{it.__name__}]" if it is not None else "list"
        return t.__name__


_BOUND = re.compile(r"^\s*(>=|<=|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")
_CHOICES = re.compile(r"\bone of:\s*([^)]*)")
_OPS = {">": float.__gt__, ">=": float.__ge__, "<": float.__lt__, "<=": float.__le__}


def _parse_constraint(help_text: str):
    """Returns `(bounds, choices)` found in a help comment (see the module docstring)."""
    bounds: list[tuple[str, float]] = []
    for group in re.findall(r"\(([^()]*)\)", help_text):
        parts = [_BOUND.match(p) for p in group.split(",")]
        if parts and all(parts):
            bounds += [(m.group(1), float(m.group(2))) for m in parts]
    choices = None
    m = _CHOICES.search(help_text)
    if m:
        choices = tuple(c.strip() for c in m.group(1).split(",") if c.strip())
    return tuple(bounds), choices


def _comments(source: str) -> dict[int, str]:
    """Maps line number (1-based) to the text of the comment on that line."""
    out = {}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                out[tok.start[0]] = tok.string.lstrip("#").strip()
    except (tokenize.TokenError, IndentationError):
        pass
    return out


def _parameters_cell(nb):
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    return cells[0] if cells else None


def notebook_parameters(nb, name: str = "notebook") -> dict[str, Parameter]:
    """Parses the cell tagged `parameters` of a notebook into `{name: Parameter}`.

    **Arguments:**

    - `nb`: an `nbformat` notebook (see `read_notebook`).
    - `name`: how to call the notebook in error messages.

    **Returns:** the parameters in declaration order. Raises `RunnerError` when the cell is
    missing or a declaration breaks the rules of the module docstring.
    """
    cell = _parameters_cell(nb)
    if cell is None:
        raise RunnerError(f"{name} has no cell tagged 'parameters': declare its knobs there")
    source = cell.source
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        raise RunnerError(f"{name}: the parameters cell is not valid Python: {e}") from None
    comments = _comments(source)
    params: dict[str, Parameter] = {}
    errors = []
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign):
            targets, value = stmt.targets, stmt.value
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            targets, value = [stmt.target], stmt.value
        else:
            continue  # imports, expressions: run by the notebook, not knobs
        line = stmt.lineno
        if len(targets) != 1 or not isinstance(targets[0], ast.Name):
            errors.append(f"line {line}: declare one parameter per assignment, `name = value`")
            continue
        key = targets[0].id
        try:
            default = eval(compile(ast.Expression(value), "<parameters>", "eval"),
                           {"__builtins__": {}}, {})
        except Exception:
            errors.append(f"line {line}: the default of '{key}' must be a literal, got "
                          f"`{ast.get_source_segment(source, value)}`; derive values in a later cell")
            continue
        help_text = " ".join(comments[i] for i in range(line, stmt.end_lineno + 1) if i in comments)
        bounds, choices = _parse_constraint(help_text)
        p = Parameter(key, default, help_text, bounds)
        if choices is not None:  # read as YAML unless the parameter holds strings
            strings = p.type is str or (p.type is list and p.item_type is str)
            choices = tuple(c if strings else yaml_value(c) for c in choices)
            p = Parameter(key, default, help_text, bounds, choices)
        numeric = p.type in (int, float) or (p.type is list and p.item_type in (int, float, None))
        if bounds and not numeric and p.type is not None:
            errors.append(f"'{key}': bounds {_bounds_str(bounds)} on a {p.type_name} parameter")
        params[key] = p
    if errors:
        raise RunnerError(f"{name}: bad parameters cell:\n  " + "\n  ".join(errors))
    return params


def _bounds_str(bounds) -> str:
    return "(" + ", ".join(f"{op} {_num(v)}" for op, v in bounds) + ")"


def _num(v: float):
    return int(v) if float(v).is_integer() else v


# --------------------------------------------------------------------------- validation


def _check_type(p: Parameter, value: Any) -> tuple[Any, str | None]:
    """Returns `(converted value, error message or None)`."""
    t = p.type
    if t is None:
        return value, None

    def one(v, t):
        if t is float and isinstance(v, int) and not isinstance(v, bool):
            return float(v), True
        if t in (int, float) and isinstance(v, bool):
            return v, False
        return v, isinstance(v, t)

    if t is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            return value, f"expects {p.type_name}, got {_describe(value)}"
        it = p.item_type
        if it is None:
            return value, None
        out = []
        for v in value:
            v, ok = one(v, it)
            if not ok:
                return value, f"expects {p.type_name}, got an element {_describe(v)}"
            out.append(v)
        return out, None
    value2, ok = one(value, t)
    if not ok:
        hint = ""
        if t is str:
            hint = " (quote it in YAML)"
        return value, f"expects {p.type_name}, got {_describe(value)}{hint}"
    return value2, None


def _describe(v: Any) -> str:
    return f"{type(v).__name__} {v!r}"


def _check_constraint(p: Parameter, value: Any) -> str | None:
    items = value if isinstance(value, list) else [value]
    for v in items:
        if p.bounds and isinstance(v, (int, float)) and not isinstance(v, bool):
            for op, bound in p.bounds:
                if not _OPS[op](float(v), bound):
                    what = f"element {v!r}" if isinstance(value, list) else f"{v!r}"
                    return f"{what} violates {_bounds_str(p.bounds)}"
        if p.choices is not None and v not in p.choices:
            what = f"element {v!r}" if isinstance(value, list) else f"{v!r}"
            return f"{what} is not one of: {', '.join(map(str, p.choices))}"
    return None


def _unknown(key: str, params: dict[str, Parameter], nb_name: str, origin: str) -> str:
    close = difflib.get_close_matches(key, list(params), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return (f"unknown parameter '{key}' ({origin}){hint}; {nb_name} has: "
            f"{', '.join(params) or '(none)'}")


def validate(params: dict[str, Parameter], layers, nb_name: str = "notebook"):
    """Merges override layers over the defaults and checks every value.

    **Arguments:**

    - `params`: the notebook's parameters (`notebook_parameters`).
    - `layers`: `[(origin, {key: value}, raw)]`, applied in order; `origin` names the layer in
      messages (`"params/02/ci.yaml"`, `"-p"`); `raw` is `{key: text}` for command-line
      values (a `str` parameter takes the text verbatim) or `None`.

    **Returns:** `(values, origins)`: the resolved `{name: value}` in declaration order
    (reserved names such as `out_dir` left out), and where each came from. Raises
    `RunnerError` listing every problem.
    """
    params = {k: p for k, p in params.items() if k not in RESERVED}
    values = {k: p.default for k, p in params.items()}
    origins = {k: "default" for k in params}
    errors = []
    for origin, layer, raw in layers:
        for key, value in layer.items():
            if key in RESERVED:
                errors.append(f"'{key}' ({origin}) is set by the runner: use --out DIR")
                continue
            if key not in params:
                errors.append(_unknown(key, params, nb_name, origin))
                continue
            if raw is not None and params[key].type is str and not isinstance(value, str):
                value = raw[key]
            values[key], origins[key] = value, origin
    for key, p in params.items():
        value, err = _check_type(p, values[key])
        if err is None:
            values[key] = value
            err = _check_constraint(p, value)
            kind = "impossible value"
        else:
            kind = "wrong type"
        if err is not None:
            errors.append(f"{kind} for '{key}' ({origins[key]}): {err}")
    if len(errors) > 1:
        raise RunnerError(f"{len(errors)} problems:\n  " + "\n  ".join(errors))
    if errors:
        raise RunnerError(errors[0])
    return values, origins
