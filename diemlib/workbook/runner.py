r"""Run a workbook notebook headlessly with validated parameters: `diem-run`.

```
diem-run NB [--profile ci|laptop|paper] [-p KEY VALUE ...] [--params FILE] [--out DIR]
diem-run NB --list        # the notebook's parameters: type, default, help
diem-run NB --check ...   # resolve and validate only; print the resolved parameters
diem-run --list           # the notebooks and their profiles
python -m diemlib.workbook.runner ...   # the same
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
When the notebook has written `metrics.json`, the runner adds `run` to it: the command that
reruns it, when it finished, its wall time and the machine (`_run_record`).
The kernel's sockets are CurveZMQ-encrypted (else IPC), and a finished kernel is shut down
without a SIGINT, so that a successful run logs no kernel warnings (`_kernel_manager_class`).

**Scales.** The notebook defaults are the quick interactive scale: what Run All in JupyterLab
does on a laptop CPU, in minutes, still showing the effect. Each params file lists every value
that differs from them: `ci` (a smoke test whose numbers are noise), `laptop` (a CPU run that
shows the paper's effect), `paper` (the paper's configuration, all of it). `diem-run` prints
what a scale's numbers mean and writes it into `metrics.json` (`profile`, `profile_note`; see
`PROFILE_NOTES`). A `-p` VALUE may be a negative number (`-p var_y -1e-4`).

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

**Several processes** (`diemlib.em.distributed`). Under Slurm with more than one task, or with
`--coordinator HOST:PORT --num-processes N --process-id I` (or the variables
`DIEMLIB_COORDINATOR`, `DIEMLIB_NUM_PROCESSES`, `DIEMLIB_PROCESS_ID`), every process runs the
same command and the runner adds a first cell, tagged `injected-distributed`, that starts
`jax.distributed` in the kernel before the notebook's own cells. Process 0 writes the out dir as
a single process would; every other process computes with it but runs the notebook in a
temporary directory, removed at the end, so that nothing it writes reaches the out dir.

**Exit status.** 0: the notebook ran; 1: it raised (the executed notebook in the out dir shows
where); 2: bad input, nothing written.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import platform
import re
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from .metrics import write_metrics
from .params import Parameter, RunnerError, notebook_parameters, validate, yaml_value

__all__ = [
    "Parameter",
    "Plan",
    "RunnerError",
    "command_line",
    "find_notebook",
    "list_notebooks",
    "list_profiles",
    "main",
    "notebook_parameters",
    "read_notebook",
    "resolve",
    "run",
    "run_config",
    "validate",
    "write_metrics",
]

PROFILES = ("ci", "laptop", "paper")
DEFAULT_PROFILE = "laptop"
KERNEL = "python3"
# What the numbers of a run at each scale mean: printed by `diem-run` and written into the
# run's `metrics.json` as `profile` and `profile_note` (`default`: the notebook defaults alone).
PROFILE_NOTES = {
    "ci": "smoke test: checks that every code path runs, in minutes; its numbers are noise, "
          "not results",
    "default": "the notebook defaults: the quick interactive scale (minutes on a laptop CPU); "
               "shows the effect roughly, not the paper's numbers",
    "laptop": "laptop scale: a CPU run big enough to show the paper's effect; "
              "not the paper's numbers",
    "paper": "the paper's configuration (a GPU node)",
}


# --------------------------------------------------------------------------- files


def find_root(start: Path | None = None) -> Path:
    """The repository root: the nearest directory with `notebooks/` and `pyproject.toml`."""
    start = Path(start or Path.cwd()).resolve()
    for d in (start, *start.parents):
        if (d / "notebooks").is_dir() and (d / "pyproject.toml").is_file():
            return d
    pkg_root = Path(__file__).resolve().parents[2]
    return pkg_root if (pkg_root / "notebooks").is_dir() else start


def repo_path(path: str | Path) -> Path:
    """A data path from a parameter: absolute as given, else relative to the repository root.

    `diem-run` executes notebooks in the repository root and JupyterLab in `notebooks/`; this
    makes a parameter such as `data/cifar10` mean the same file in both.
    """
    path = Path(path).expanduser()
    return path if path.is_absolute() else find_root() / path


def run_config(notebook: str, namespace: dict[str, Any]) -> dict[str, Any]:
    """What a notebook run computes: the value in `namespace` (the notebook's `globals()`, right
    after its parameters cell) of every parameter its parameters cell declares, except `out_dir`
    and `overwrite` (where the run goes, whether to start afresh). EM runs keep it in their run
    directory and refuse to resume one made with other values.

    `notebook` is the notebook's stem (`04_mri`), read from `notebooks/` under the repository
    root, so the same names come back in JupyterLab (kernel in `notebooks/`) and under `diem-run`
    (kernel in the root), whatever else the kernel has defined.
    """
    root = find_root()
    path = find_notebook(notebook, root)
    names = notebook_parameters(read_notebook(path), path.stem)
    missing = [name for name in names if name not in namespace]
    if missing:
        raise RunnerError(f"{path.stem}: run its parameters cell first ({', '.join(missing)} undefined)")
    return {name: namespace[name] for name in names if name not in ("out_dir", "overwrite")}


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
        data = yaml_value(Path(path).read_text())
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
    run_name: str = "default"  # the profile, else the params file's stem, else "default"


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
            cli[key] = yaml_value(text) if text.strip() else text
        except yaml.YAMLError:
            cli[key] = text
        raw[key] = text
        sources.append(f"-p {key} {text}")
    if cli:
        layers.append(("-p", cli, raw))
    values, origins = validate(params, layers, stem)
    run_name = profile or (params_path.stem if params_path is not None else "default")
    out_dir = Path(out) if out else root / "outputs" / stem / run_name
    return Plan(notebook, nb, values, origins, out_dir.resolve(), root, sources, run_name)


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
    notebook `<stem>.ipynb` after every cell (and on failure, with the error in it). In one
    of several processes, a first cell starts `jax.distributed`, and every process but 0 runs
    in a temporary out dir (see the module's "Several processes"). A last cell records what
    the kernel compiled ([`record_compilations`][]).
    """
    from ..em import distributed

    plan = replace(plan, nb=_with_cell(plan.nb, _compilation_cell(), len(plan.nb.cells)))
    if distributed.requested() is None:
        return _execute(plan, progress, log_output)
    plan = replace(plan, nb=_with_cell(plan.nb, _distributed_cell(), 0))
    if distributed.process_id_from_env() == 0:
        return _execute(plan, progress, log_output)
    with tempfile.TemporaryDirectory(prefix=f"diem-run-process{distributed.process_id_from_env()}-") as scratch:
        return _execute(replace(plan, out_dir=Path(scratch)), progress, log_output)


def _distributed_cell():
    import nbformat

    source = "# injected by diem-run: one of several processes (diemlib.em.distributed)\n" \
             "from diemlib.em.distributed import initialize as _initialize\n_initialize()"
    return nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-distributed"]})


def _compilation_cell():
    import nbformat

    source = "# injected by diem-run: the programs this kernel compiled (diemlib.compilation)\n" \
             "from diemlib.workbook.runner import record_compilations as _record_compilations\n" \
             "_record_compilations(out_dir)"
    return nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-compilation"]})


def _with_cell(nb, cell, index: int):
    import copy

    nb = copy.deepcopy(nb)
    nb.cells.insert(index, cell)
    return nb


def record_compilations(out_dir) -> None:
    """In a notebook's kernel, after its cells: prints how many programs XLA compiled and how
    many were loaded from the persistent compilation cache instead (`diemlib.compilation`), and
    adds them to the notebook's `metrics.json` as `compilation` (if it wrote one)."""
    import jax

    from ..compilation import compilations

    built = compilations()
    cache = jax.config.jax_compilation_cache_dir if jax.config.jax_enable_compilation_cache else None
    print(f"diem-run: {built} (compilation cache: {cache or 'off'})")
    if (Path(out_dir) / "metrics.json").is_file():
        write_metrics(out_dir, compilation={"compiled": built.compiled, "loaded": built.loaded,
                                            "seconds": built.seconds, "cache": cache})


def _execute(plan: Plan, progress: bool, log_output: bool) -> Path:
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
    # The kernel inherits this: diemlib's progress bars print plain lines at a modest rate
    # (to this log and the executed notebook) instead of widgets nobody sees.
    os.environ.setdefault("DIEMLIB_PROGRESS", "log")
    started = time.perf_counter()
    executed = papermill.execute_notebook(
        plan.nb, str(output), parameters=parameters, kernel_name=KERNEL, language="python",
        cwd=str(plan.root), progress_bar=progress, log_output=log_output,
        kernel_manager_class=_kernel_manager_class(),
    )
    if (plan.out_dir / "metrics.json").is_file():
        note = PROFILE_NOTES.get(plan.run_name)
        labels = {"profile": plan.run_name, "profile_note": note} if note else {}
        write_metrics(plan.out_dir, **labels,
                      run=_run_record(plan, executed, time.perf_counter() - started))
    return output


def command_line(stem: str, sources: list[str], run_name: str, out_dir: Path | None = None) -> str:
    """The `diem-run` command of a run from its parameter sources (`Plan.sources`, or the
    `# from:` line of its `params.yaml`): `--profile` if its params file is the profile's,
    `--params FILE` for another, `--defaults` for none; its `-p` overrides; `--out` if given."""
    files = [s for s in sources[1:] if not s.startswith("-p ")]
    args = ["diem-run", stem]
    if not files:
        args.append("--defaults")
    elif files[0] == f"params/{stem}/{run_name}.yaml":
        args += ["--profile", run_name]
    else:  # --profile names the out dir where it is not the params file's stem
        args += ["--params", files[0]] + (["--profile", run_name] if Path(files[0]).stem != run_name else [])
    args += [part for s in sources[1:] if s.startswith("-p ") for part in s.split(" ", 2)]
    return shlex.join(args + (["--out", str(out_dir)] if out_dir is not None else []))


# What the notebooks print with `print(jax.devices())`, e.g. `[CpuDevice(id=0)]`.
_DEVICES = re.compile(r"\[(\w+Device\(id=\d+[^\]]*)\]")


def _run_record(plan: Plan, executed, wall_time_s: float) -> dict[str, Any]:
    """`run` in `metrics.json`: the command that reruns the run (`--out` only where it is not
    `outputs/<stem>/<run>`), when it finished, its wall time (this invocation's: a resumed EM run
    counts from its resumption), and the machine. The runner never starts JAX (on a GPU that
    would claim the device's memory): `jax_devices` is what the notebook printed, if it did."""
    default_out = (plan.root / "outputs" / plan.notebook.stem / plan.run_name).resolve()
    printed = (output.get("text", "") for cell in executed.cells for output in cell.get("outputs", [])
               if output.get("name") == "stdout")
    devices = next((m.group(1) for text in printed if (m := _DEVICES.search(text))), None)
    cpuinfo = Path("/proc/cpuinfo")
    models = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M) if cpuinfo.is_file() else []
    return {
        "command": command_line(plan.notebook.stem, plan.sources, plan.run_name,
                                None if plan.out_dir == default_out else plan.out_dir),
        "finished": datetime.now().astimezone().isoformat(timespec="seconds"),
        "wall_time_s": round(wall_time_s, 1),
        "machine": {"platform": platform.platform(),
                    "processor": models[0] if models else platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "jax_devices": devices},
    }


@functools.cache
def _kernel_manager_class():
    """The kernel manager of headless runs: quiet on a successful run.

    - **Transport.** ipykernel >= 7 warns at every start of a kernel over plain TCP ("Kernel is
      running over TCP without encryption"). The kernel's sockets are CurveZMQ-encrypted when
      libzmq has CURVE (jupyter_client provisions the keys for a kernelspec that declares
      `supported_encryption: curve`, as ipykernel's does), else IPC sockets (POSIX).
    - **Shutdown.** jupyter_client sends SIGINT before its shutdown request. A finished
      notebook's kernel has nothing to interrupt, but a SIGINT that lands while it is still in
      the handler of papermill's last request (kernel_info) is logged by the kernel as
      "KeyboardInterrupt caught in kernel". The shutdown request alone stops it; a kernel that
      does not stop is still terminated, then killed, by jupyter_client.
    """
    import zmq
    from jupyter_client.manager import AsyncKernelManager
    from jupyter_core.paths import jupyter_runtime_dir

    curve = zmq.has("curve") and "transport_encryption" in AsyncKernelManager.class_trait_names()

    class HeadlessKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            if curve:
                kwargs.setdefault("transport_encryption", "auto")
            elif os.name == "posix":
                kwargs.setdefault("transport", "ipc")
                runtime = Path(jupyter_runtime_dir())
                runtime.mkdir(parents=True, exist_ok=True)
                kwargs.setdefault("ip", str(runtime / f"diem-kernel-{os.getpid()}-{id(self):x}"))
            super().__init__(**kwargs)

        async def _async_interrupt_kernel(self):
            if self.shutting_down:
                return
            await super()._async_interrupt_kernel()

    return HeadlessKernelManager


# --------------------------------------------------------------------------- command line


def _format_parameters(stem: str, params: dict[str, Parameter], root: Path) -> str:
    rows = [(p.name, p.type_name, repr(p.default), p.help) for p in params.values()]
    w = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(("name", "type", "default"))]
    lines = [f"{stem}: parameters (profiles: {', '.join(list_profiles(stem, root)) or 'none'})",
             f"  {'name':<{w[0]}}  {'type':<{w[1]}}  {'default':<{w[2]}}  help"]
    lines += [f"  {a:<{w[0]}}  {b:<{w[1]}}  {c:<{w[2]}}  {d}" for a, b, c, d in rows]
    return "\n".join(lines)


# A `-p` VALUE such as -1e-4 or -.inf is a value, not an option: argparse (before Python 3.13)
# takes only -1 and -0.5 for negative numbers.
_NEGATIVE_NUMBER = re.compile(
    r"^-(?:(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)(?:[eE][-+]?\d+)?|\.?(?:inf|Inf|INF))$"
)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER

    def error(self, message):
        if "-p/--parameter" in message:
            message += (" (-p KEY VALUE: a VALUE that starts with '-' must be a number, "
                        "e.g. -p var_y -1e-4)")
        super().error(message)


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="diem-run",
        description="Run a workbook notebook (notebooks/NB.py) with papermill, parameters = "
                    "notebook defaults <- params/NB/PROFILE.yaml <- -p overrides.",
        epilog="Declaring parameters and constraints: see "
               "`python -m pydoc diemlib.workbook.runner`.",
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
    group = ap.add_argument_group(
        "several processes", "one run over the devices of several processes or nodes (Slurm "
        "needs none of these); every process runs the same command with its own --process-id")
    group.add_argument("--coordinator", metavar="HOST:PORT",
                       help="address of process 0 (sets DIEMLIB_COORDINATOR)")
    group.add_argument("--num-processes", type=int, metavar="N",
                       help="number of processes (sets DIEMLIB_NUM_PROCESSES)")
    group.add_argument("--process-id", type=int, metavar="I",
                       help="this process, 0 to N - 1 (sets DIEMLIB_PROCESS_ID)")
    return ap


def _set_distributed_env(args) -> None:
    """`--coordinator`, `--num-processes`, `--process-id` into the variables the kernel reads."""
    from ..em import distributed

    given = {distributed.ENV_COORDINATOR: args.coordinator,
             distributed.ENV_NUM_PROCESSES: args.num_processes,
             distributed.ENV_PROCESS_ID: args.process_id}
    for name, value in given.items():
        if value is not None:
            os.environ[name] = str(value)
    try:
        distributed.requested()
    except ValueError as error:
        raise RunnerError(f"{error} (options --coordinator, --num-processes, --process-id)") from None


def main(argv: list[str] | None = None) -> int:
    """Command line entry point of `diem-run`; returns the exit status."""
    args = _parser().parse_args(argv)
    root = args.root.resolve() if args.root else find_root()
    try:
        _set_distributed_env(args)
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

    note = PROFILE_NOTES.get(plan.run_name)
    note = f"diem-run: {plan.run_name}: {note}" if note else None
    print(f"diem-run: {plan.notebook.stem} -> {plan.out_dir}", file=sys.stderr)
    if note:
        print(note, file=sys.stderr)
    try:
        output = run(plan, progress=not args.no_progress)
    except PapermillExecutionError as e:
        print(f"diem-run: {plan.notebook.stem} failed in cell {e.exec_count}: {e.ename}: "
              f"{e.evalue}\n  see {plan.out_dir / (plan.notebook.stem + '.ipynb')}",
              file=sys.stderr)
        return 1
    print(f"diem-run: done: {output}", file=sys.stderr)
    if note:
        print(note, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
