r"""Run a workbook notebook headlessly with validated parameters: `diem-run`.

```
diem-run NB [--profile ci|laptop|paper] [-p KEY VALUE ...] [--params FILE] [--out DIR]
diem-run NB --list        # the notebook's parameters: type, default, help
diem-run NB --check ...   # resolve and validate only; print the resolved parameters
diem-run --list           # the notebooks and their profiles
python -m diemlib.runner ...   # the same
```

**Layout.** The source of truth of a notebook is `notebooks/NN_name.py` (jupytext percent
format, paired with `notebooks/NN_name.ipynb`). `NB` is its stem (`02_tweedie_covariance`), a
unique prefix of it (`02`), or a path to a `.py` file. Its parameters for a profile live in
`params/<stem>/<profile>.yaml`, a flat YAML mapping `name: value`. A run writes into
`outputs/<stem>/<profile>/` (or `--out DIR`): the executed notebook `<stem>.ipynb`, the resolved
parameters `params.yaml` (itself a valid params file: `--params outputs/.../params.yaml` re-runs
it), and what the notebook writes itself: figures (PNG) and `metrics.json` (see
`write_metrics`). Files already in the out dir are overwritten only by files of the same name.
The repository root is `--root`, else the nearest of the working directory and its parents that
holds `notebooks/` and `pyproject.toml`.

**Resolution.** parameters = notebook defaults ← params file ← `-p` overrides, in that order.
`-p` values and params files are read as YAML (`3`, `1e-3`, `true`, `tweedie`, `[0, 1, 3]`,
`null`); `1e-3` is a float (YAML 1.2, unlike PyYAML's default), and a `-p` value for a `str`
parameter is taken verbatim (`-p tag 007` gives `"007"`). Every value is validated before
anything is created or written; all problems are reported at once and the command exits 2.

**Execution.** papermill runs the notebook with kernel `python3` and working directory = the
**repository root** (relative data paths in parameters are relative to it). The runner always
injects `out_dir`, the absolute path of the out dir, as a string. Declare it in the parameters
cell so the notebook also runs in Jupyter, where the kernel starts in `notebooks/`:
`out_dir = "../outputs/NN_name/interactive"  # where figures and metrics.json go (set by diem-run)`.
`out_dir` is reserved: set it with `--out`, not with `-p` or a params file.

**Declaring parameters.** The notebook's cell tagged `parameters` holds one assignment per
knob, `name = default  # help text`:

- The default is a literal (or literal arithmetic such as `2**20`): an `int`, `float`, `str`,
  `bool`, `list`/`tuple` or `dict`, or `None`. Its type is the parameter's type: a value of
  another type is refused, except that an `int` is accepted (and converted) where a `float` is
  expected. The elements of a list must have the type of the default's elements (when the
  default is non-empty and of one type). A `None` default accepts any value.
- The trailing comment is the help text. It may carry a constraint, in this small syntax:

  ```
  steps = 256          # sampler steps (> 0)
  tau = 0.1            # corrector step size (> 0, <= 1)
  cg_iters = 3         # CG iterations (>= 0)
  covariance = "tweedie"   # Var[x | x_t] choice; one of: tweedie, zero, sigma, prior
  laps_to_plot = [0, 1, 3] # laps shown in the corner plots (>= 0)
  ```

  - **bounds**: a parenthesised, comma-separated list of comparisons `OP NUMBER`, with `OP` one
    of `>`, `>=`, `<`, `<=`; every comparison must hold. Other parenthesised text is just text.
  - **choices**: `one of: a, b, c` up to the end of the comment (or to a closing `)`): the
    value must equal one of them (each read as YAML, so `one of: 1, 3, 5` are ints, except
    for a `str` parameter, whose choices are the texts).
  - For a list, the constraint applies to every element.

  A constraint on a parameter whose type cannot satisfy it (bounds on a `str`) is reported as
  an error in the notebook. The parameters are read with `ast` from the cell's source, not
  with papermill's `inspect_notebook`, whose line regex gives up on any line with two `=`
  (as in `(>= 0)`).

**Exit status.** 0: the notebook ran; 1: it raised (the executed notebook in the out dir shows
where); 2: bad input, nothing written.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import io
import json
import logging
import math
import re
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .checkpoint import atomic_write_json

__all__ = [
    "Parameter",
    "Plan",
    "RunnerError",
    "find_notebook",
    "list_notebooks",
    "list_profiles",
    "main",
    "notebook_parameters",
    "read_notebook",
    "resolve",
    "run",
    "validate",
    "write_metrics",
]

PROFILES = ("ci", "laptop", "paper")
DEFAULT_PROFILE = "laptop"
RESERVED = ("out_dir",)
KERNEL = "python3"


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
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
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


def _yaml(text: str) -> Any:
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
            choices = tuple(c if strings else _yaml(c) for c in choices)
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


# --------------------------------------------------------------------------- files


def find_root(start: Path | None = None) -> Path:
    """The repository root: the nearest directory with `notebooks/` and `pyproject.toml`."""
    start = Path(start or Path.cwd()).resolve()
    for d in (start, *start.parents):
        if (d / "notebooks").is_dir() and (d / "pyproject.toml").is_file():
            return d
    pkg_root = Path(__file__).resolve().parents[1]
    return pkg_root if (pkg_root / "notebooks").is_dir() else start


def list_notebooks(root: Path) -> list[Path]:
    """The notebooks `notebooks/*.py` under `root`, sorted."""
    return sorted((Path(root) / "notebooks").glob("*.py"))


def find_notebook(name: str, root: Path) -> Path:
    """Finds a notebook by stem, unique prefix, file name, or path to a `.py` file."""
    path = Path(name)
    if path.suffix == ".py" and path.is_file():
        return path.resolve()
    available = list_notebooks(root)
    stem = path.name.removesuffix(".py").removesuffix(".ipynb")
    exact = [p for p in available if p.stem == stem]
    if exact:
        return exact[0]
    prefixed = [p for p in available if p.stem.startswith(stem)]
    if len(prefixed) == 1:
        return prefixed[0]
    names = ", ".join(p.stem for p in available) or "(none)"
    if prefixed:
        raise RunnerError(f"notebook '{name}' is ambiguous: {', '.join(p.stem for p in prefixed)}")
    raise RunnerError(f"no notebook '{name}' in {Path(root) / 'notebooks'}; available: {names}")


def list_profiles(stem: str, root: Path) -> list[str]:
    """The profiles with a params file `params/<stem>/<profile>.yaml`."""
    return sorted(p.stem for p in (Path(root) / "params" / stem).glob("*.yaml"))


def params_file(stem: str, profile: str, root: Path) -> Path:
    """`params/<stem>/<profile>.yaml`; raises `RunnerError` listing the profiles if missing."""
    path = Path(root) / "params" / stem / f"{profile}.yaml"
    if not path.is_file():
        have = ", ".join(list_profiles(stem, root)) or "(none)"
        raise RunnerError(f"no params file {path} for profile '{profile}'; "
                          f"available profiles of {stem}: {have}")
    return path


def read_params_file(path: Path) -> dict[str, Any]:
    """Reads a flat YAML mapping of parameter values (empty file: `{}`)."""
    try:
        data = _yaml(Path(path).read_text())
    except yaml.YAMLError as e:
        raise RunnerError(f"params file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise RunnerError(f"params file {path} must be a mapping `name: value`")
    return data


def read_notebook(path: Path):
    """Reads a jupytext `.py` notebook into an in-memory `nbformat` notebook (kernel python3)."""
    import jupytext

    nb = jupytext.read(str(path))
    nb.metadata["kernelspec"] = {"name": KERNEL, "display_name": "Python 3", "language": "python"}
    nb.metadata.setdefault("language_info", {"name": "python"})
    return nb


# --------------------------------------------------------------------------- resolve and run


@dataclass
class Plan:
    """A validated run: what to execute, with which values, and where to write."""

    notebook: Path
    nb: Any
    values: dict[str, Any]
    origins: dict[str, str]
    out_dir: Path
    root: Path
    sources: list[str]


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)


def resolve(name: str, profile: str | None = DEFAULT_PROFILE, overrides=(),
            params_path: Path | None = None, out: Path | None = None,
            root: Path | None = None) -> Plan:
    """Finds the notebook and its params file and validates the merged parameters.

    Writes nothing. `overrides` is a sequence of `(key, text)` pairs, each text read as YAML.
    The params file is `params_path`, else `params/<stem>/<profile>.yaml`; with neither
    (`profile=None`) the notebook defaults are used. The out dir is `out`, else
    `outputs/<stem>/<run>` with `<run>` the profile, else the stem of `params_path`, else
    `default`.
    """
    root = Path(root).resolve() if root else find_root()
    notebook = find_notebook(name, root)
    nb = read_notebook(notebook)
    stem = notebook.stem
    params = notebook_parameters(nb, stem)
    layers, sources = [], [_rel(notebook, root)]
    if params_path is None and profile is not None:
        params_path = params_file(stem, profile, root)
    if params_path is not None:
        params_path = Path(params_path)
        if not params_path.is_file():
            raise RunnerError(f"no params file {params_path}")
        origin = _rel(params_path, root)
        layers.append((origin, read_params_file(params_path), None))
        sources.append(origin)
    cli, raw = {}, {}
    for key, text in overrides:
        try:
            cli[key] = _yaml(text) if text.strip() else text
        except yaml.YAMLError:
            cli[key] = text
        raw[key] = text
        sources.append(f"-p {key} {text}")
    if cli:
        layers.append(("-p", cli, raw))
    values, origins = validate(params, layers, stem)
    run_name = profile or (params_path.stem if params_path is not None else "default")
    out_dir = Path(out) if out else root / "outputs" / stem / run_name
    return Plan(notebook, nb, values, origins, out_dir.resolve(), root, sources)


def _dump_params(plan: Plan) -> str:
    header = ["# Parameters resolved by diem-run; usable as a params file (--params).",
              "# from: " + " <- ".join(plan.sources),
              f"# out_dir: {plan.out_dir}"]
    body = yaml.safe_dump(plan.values, sort_keys=False, default_flow_style=None,
                          allow_unicode=True) if plan.values else "{}\n"
    return "\n".join(header) + "\n" + body


class _QuietInspection(logging.Filter):
    def filter(self, record):
        msg = record.getMessage()
        return not msg.startswith(("Passed unknown parameter", "Unable to parse line",
                                   "Input Notebook:", "Executing Cell", "Ending Cell"))


def run(plan: Plan, progress: bool = True, log_output: bool = True) -> Path:
    """Executes a validated plan with papermill; returns the executed notebook's path.

    Creates the out dir, writes `params.yaml`, then runs the notebook (kernel python3, cwd =
    repository root) with the resolved values and `out_dir` injected, saving the executed
    notebook `<stem>.ipynb` after every cell (and on failure, with the error in it).
    """
    import papermill

    # papermill's own parameter inspection (a line regex) misreads `>=` in help comments and
    # then warns about "unknown" parameters; the runner has validated them already. Cell
    # banners are dropped too: the progress bar counts cells, the log keeps cell outputs.
    for name in ("papermill", "papermill.translators"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietInspection) for f in logger.filters):
            logger.addFilter(_QuietInspection())
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    (plan.out_dir / "params.yaml").write_text(_dump_params(plan))
    output = plan.out_dir / f"{plan.notebook.stem}.ipynb"
    parameters = {**plan.values, "out_dir": str(plan.out_dir)}
    papermill.execute_notebook(
        plan.nb, str(output), parameters=parameters, kernel_name=KERNEL, language="python",
        cwd=str(plan.root), progress_bar=progress, log_output=log_output,
    )
    return output


def write_metrics(out_dir, metrics: dict | None = None, **more) -> dict:
    """Merges numbers into `<out_dir>/metrics.json` and returns the whole file's content.

    Arrays and numpy/JAX scalars become (nested lists of) Python numbers; non-finite floats
    are written as strings (`"nan"`, `"inf"`) so that the file stays valid JSON.
    """
    path = Path(out_dir) / "metrics.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(_jsonable({**(metrics or {}), **more}))
    atomic_write_json(path, data)
    return data


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "tolist"):
        return _jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


# --------------------------------------------------------------------------- command line


def _format_parameters(stem: str, params: dict[str, Parameter], root: Path) -> str:
    rows = [(p.name, p.type_name, repr(p.default), p.help) for p in params.values()]
    w = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(("name", "type", "default"))]
    lines = [f"{stem}: parameters (profiles: {', '.join(list_profiles(stem, root)) or 'none'})",
             f"  {'name':<{w[0]}}  {'type':<{w[1]}}  {'default':<{w[2]}}  help"]
    lines += [f"  {a:<{w[0]}}  {b:<{w[1]}}  {c:<{w[2]}}  {d}" for a, b, c, d in rows]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="diem-run",
        description="Run a workbook notebook (notebooks/NB.py) with papermill, parameters = "
                    "notebook defaults <- params/NB/PROFILE.yaml <- -p overrides.",
        epilog="Declaring parameters and constraints: see `python -m pydoc diemlib.runner`.",
    )
    ap.add_argument("notebook", nargs="?", metavar="NB",
                    help="notebook stem (02_tweedie_covariance), unique prefix (02), or .py path")
    ap.add_argument("--profile",
                    help=f"use params/NB/PROFILE.yaml: {', '.join(PROFILES)} "
                         f"(default: {DEFAULT_PROFILE})")
    ap.add_argument("--params", type=Path, metavar="FILE",
                    help="use this params file instead (out dir named after --profile, "
                         "else after FILE)")
    ap.add_argument("--defaults", action="store_true",
                    help="use no params file: the notebook defaults (and -p) only; "
                         "out dir outputs/NB/default")
    ap.add_argument("-p", "--parameter", nargs=2, action="append", default=[],
                    metavar=("KEY", "VALUE"), help="override one parameter (VALUE read as YAML)")
    ap.add_argument("--out", type=Path, metavar="DIR",
                    help="output directory (default: outputs/NB/PROFILE)")
    ap.add_argument("--root", type=Path, metavar="DIR",
                    help="repository root (default: found from the working directory)")
    ap.add_argument("--list", action="store_true",
                    help="print the notebook's parameters (or, without NB, the notebooks)")
    ap.add_argument("--check", action="store_true",
                    help="validate and print the resolved parameters; run nothing")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Command line entry point of `diem-run`; returns the exit status."""
    args = _parser().parse_args(argv)
    root = args.root.resolve() if args.root else find_root()
    try:
        if args.notebook is None:
            if not args.list:
                _parser().print_usage(sys.stderr)
                raise RunnerError("give a notebook, or --list to list them")
            if not list_notebooks(root):
                print(f"no notebooks in {root / 'notebooks'}")
            for nb in list_notebooks(root):
                print(f"{nb.stem}  (profiles: {', '.join(list_profiles(nb.stem, root)) or 'none'})")
            return 0
        if args.list:
            notebook = find_notebook(args.notebook, root)
            params = notebook_parameters(read_notebook(notebook), notebook.stem)
            print(_format_parameters(notebook.stem, params, root))
            return 0
        profile = args.profile
        if args.defaults:
            if profile is not None or args.params is not None:
                raise RunnerError("--defaults uses no params file: drop --profile/--params")
        elif profile is None and args.params is None:
            profile = DEFAULT_PROFILE
        plan = resolve(args.notebook, profile, args.parameter, args.params, args.out, root)
    except RunnerError as e:
        print(f"diem-run: error: {e}", file=sys.stderr)
        return 2
    if args.check:
        print(_dump_params(plan), end="")
        return 0
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    from papermill.exceptions import PapermillExecutionError

    print(f"diem-run: {plan.notebook.stem} -> {plan.out_dir}", file=sys.stderr)
    try:
        output = run(plan, progress=not args.no_progress)
    except PapermillExecutionError as e:
        print(f"diem-run: {plan.notebook.stem} failed in cell {e.exec_count}: {e.ename}: "
              f"{e.evalue}\n  see {plan.out_dir / (plan.notebook.stem + '.ipynb')}",
              file=sys.stderr)
        return 1
    print(f"diem-run: done: {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
