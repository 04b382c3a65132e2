"""The workbook runner `diem-run` (diemlib.runner) and the notebooks/params it runs.

The runner is tested on a toy notebook, `tests/fixtures/notebooks/00_toy.py`, copied with its
params files into a temporary repository root. The last tests check the real workbook:
every `notebooks/*.py` is paired and in sync with its `.ipynb`, declares its parameters
properly, has its three profiles, every params file validates, and (marked slow) every
notebook runs at profile `ci`.
"""

import json
import os
import shlex
import shutil
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import jupytext
import numpy as np
import nbformat
import pytest
import yaml

from diemlib.workbook import report, runner
from diemlib.workbook.params import RunnerError, _parse_constraint, notebook_parameters
from diemlib.workbook.runner import main, read_notebook, resolve

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))
PARAM_FILES = sorted((ROOT / "params").glob("*/*.yaml"))


@pytest.fixture
def root(tmp_path):
    """A repository root holding the toy notebook and its params files (ci, laptop)."""
    repo = tmp_path / "repo"
    shutil.copytree(FIXTURES / "notebooks", repo / "notebooks")
    shutil.copytree(FIXTURES / "params", repo / "params")
    (repo / "pyproject.toml").write_text("")
    return repo


def error(root, *overrides, profile="ci", name="00_toy", **kwargs) -> str:
    """The message of the RunnerError raised by resolving with `-p` overrides."""
    pairs = list(zip(overrides[::2], overrides[1::2]))
    with pytest.raises(RunnerError) as e:
        resolve(name, profile, pairs, root=root, **kwargs)
    return str(e.value)


def values(root, *overrides, profile="ci"):
    pairs = list(zip(overrides[::2], overrides[1::2]))
    return resolve("00_toy", profile, pairs, root=root).values


def write_notebook(root, name, parameters_cell):
    path = root / "notebooks" / f"{name}.py"
    path.write_text(f'# %% tags=["parameters"]\n{parameters_cell}\n\n# %%\nprint(1)\n')
    return path


def snapshot(directory: Path) -> dict:
    return {p.relative_to(directory): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


# ------------------------------------------------------------------ declaring parameters


def test_parameters_cell_is_parsed(root):
    params = notebook_parameters(read_notebook(root / "notebooks" / "00_toy.py"))
    assert list(params) == ["out_dir", "steps", "lr", "cg_iters", "covariance", "verbose",
                            "laps", "n_samples", "tag"]
    steps, lr, cov, laps = params["steps"], params["lr"], params["covariance"], params["laps"]
    assert (steps.default, steps.type, steps.help) == (256, int, "sampler steps (> 0)")
    assert steps.bounds == ((">", 0.0),) and steps.choices is None
    assert lr.type is float and lr.bounds == ((">", 0.0), ("<=", 1.0))
    assert params["cg_iters"].bounds == ((">=", 0.0),)
    assert cov.type is str and cov.choices == ("tweedie", "zero", "sigma", "prior")
    assert laps.type_name == "list[int]" and laps.bounds == ((">=", 0.0),)
    assert params["verbose"].type is bool and params["n_samples"].default == 1024
    assert params["tag"].bounds == () and params["tag"].choices is None


def test_constraint_syntax():
    parse = _parse_constraint
    assert parse("steps (> 0)") == (((">", 0.0),), None)
    assert parse("rate (>= 0, < 1e-1)") == (((">=", 0.0), ("<", 0.1)), None)
    assert parse("a size (paper: 4096)") == ((), None)  # other parentheses are text
    assert parse("solver; one of: cg, gmres") == ((), ("cg", "gmres"))
    assert parse("iterations (one of: 1, 3, 5)") == ((), ("1", "3", "5"))


@pytest.mark.parametrize("cell, message", [
    ("n = len([1])  # n", "the default of 'n' must be a literal"),
    ("a, b = 1, 2", "one parameter per assignment"),
    ("name = 'x'  # a name (> 0)", "bounds (> 0) on a str parameter"),
])
def test_bad_parameters_cell(root, cell, message):
    write_notebook(root, "01_bad", cell)
    assert message in error(root, name="01_bad", profile=None)


def test_notebook_without_parameters_cell(root):
    (root / "notebooks" / "01_bare.py").write_text("# %%\nx = 1\n")
    assert "no cell tagged 'parameters'" in error(root, name="01_bare", profile=None)


def test_typed_choices_and_none_default(root):
    write_notebook(root, "01_more", "iters = 3  # one of: 1, 3, 5\nckpt = None  # anything\n"
                                    "scale = 1.0  # (>= 0)\nnames = ['a']  # one of: a, b")
    ok = resolve("01_more", None, [("iters", "5"), ("ckpt", "x.eqx"), ("scale", "2"),
                                   ("names", "[b, a]")], root=root).values
    assert ok == {"iters": 5, "ckpt": "x.eqx", "scale": 2.0, "names": ["b", "a"]}
    assert isinstance(ok["scale"], float)
    assert "not one of: 1, 3, 5" in error(root, "iters", "4", name="01_more", profile=None)
    assert "element 'c'" in error(root, "names", "[a, c]", name="01_more", profile=None)


# ------------------------------------------------------------------ resolution


def test_resolution_order(root):
    plan = resolve("00_toy", "ci", [("steps", "16")], root=root)
    assert plan.values["steps"] == 16  # -p beats the params file (8) and the default (256)
    assert plan.values["lr"] == 0.01  # params file (`1e-2`, a float) beats the default
    assert plan.values["laps"] == [0, 1]
    assert plan.values["cg_iters"] == 3  # default
    assert plan.origins == {**dict.fromkeys(plan.values, "default"), "steps": "-p",
                            "lr": "params/00_toy/ci.yaml", "laps": "params/00_toy/ci.yaml"}
    assert "out_dir" not in plan.values
    assert plan.out_dir == root / "outputs" / "00_toy" / "ci"
    assert resolve("00_toy", "laptop", root=root).values["covariance"] == "zero"
    assert resolve("00_toy", None, root=root).values["steps"] == 256  # defaults only
    assert resolve("00", "ci", root=root).notebook.name == "00_toy.py"  # unique prefix


def test_values_are_yaml_scalars(root):
    v = values(root, "lr", "1e-4", "verbose", "true", "laps", "[2, 4]", "covariance", "prior")
    assert (v["lr"], v["verbose"], v["laps"], v["covariance"]) == (1e-4, True, [2, 4], "prior")
    v = values(root, "lr", "1", "tag", "007", "n_samples", "2048")
    assert v["lr"] == 1.0 and isinstance(v["lr"], float)  # int accepted where float expected
    assert v["tag"] == "007"  # a str parameter takes the text verbatim
    assert v["n_samples"] == 2048


def test_unknown_key(root):
    msg = error(root, "stpes", "3")
    assert "unknown parameter 'stpes'" in msg and "did you mean 'steps'" in msg
    assert "steps, lr, cg_iters, covariance, verbose, laps, n_samples, tag" in msg
    (root / "params" / "00_toy" / "ci.yaml").write_text("steps: 8\nlearning_rate: 0.1\n")
    msg = error(root)
    assert "unknown parameter 'learning_rate' (params/00_toy/ci.yaml)" in msg
    assert "00_toy has: steps, lr" in msg


@pytest.mark.parametrize("key, value, expected, got", [
    ("steps", "2.5", "expects int", "got float 2.5"),
    ("steps", "true", "expects int", "got bool True"),
    ("lr", "abc", "expects float", "got str 'abc'"),
    ("verbose", "1", "expects bool", "got int 1"),
    ("laps", "3", "expects list[int]", "got int 3"),
    ("laps", "[1, x]", "expects list[int]", "got an element str 'x'"),
])
def test_wrong_type(root, key, value, expected, got):
    msg = error(root, key, value)
    assert f"wrong type for '{key}' (-p)" in msg and expected in msg and got in msg


def test_wrong_type_in_params_file(root):
    (root / "params" / "00_toy" / "ci.yaml").write_text("tag: 7\n")
    msg = error(root)
    assert "wrong type for 'tag' (params/00_toy/ci.yaml): expects str, got int 7" in msg


@pytest.mark.parametrize("key, value, constraint", [
    ("steps", "0", "0 violates (> 0)"),
    ("lr", "2", "2.0 violates (> 0, <= 1)"),
    ("cg_iters", "-1", "-1 violates (>= 0)"),
    ("covariance", "foo", "'foo' is not one of: tweedie, zero, sigma, prior"),
    ("laps", "[1, -1]", "element -1 violates (>= 0)"),
])
def test_impossible_value(root, key, value, constraint):
    msg = error(root, key, value)
    assert f"impossible value for '{key}' (-p)" in msg and constraint in msg


def test_all_problems_reported_at_once(root):
    msg = error(root, "steps", "0", "verbose", "1", "nope", "1")
    assert msg.startswith("3 problems")
    assert "'nope'" in msg and "'steps'" in msg and "'verbose'" in msg


def test_out_dir_is_reserved(root):
    assert "set by the runner: use --out" in error(root, "out_dir", "/tmp/x")


def test_missing_notebook(root):
    msg = error(root, name="07_nothing")
    assert "no notebook '07_nothing'" in msg and "available: 00_toy" in msg


def test_missing_params_file(root):
    msg = error(root, profile="paper")
    assert "no params file" in msg and "paper.yaml" in msg
    assert "available profiles of 00_toy: ci, laptop" in msg


def test_bad_params_files(root):
    path = root / "params" / "00_toy" / "ci.yaml"
    path.write_text("steps: 8\nsteps: 9\n")
    assert "duplicate key 'steps'" in error(root)
    path.write_text("- 1\n- 2\n")
    assert "must be a mapping" in error(root)
    path.write_text("# nothing set\n")
    assert values(root)["steps"] == 256


# ------------------------------------------------------------------ command line


def test_bad_input_writes_nothing(root, capsys):
    out = root / "outputs" / "00_toy" / "ci"
    out.mkdir(parents=True)
    (out / "params.yaml").write_text("steps: 8  # from an earlier run\n")
    (out / "00_toy.ipynb").write_text("{}")
    (out / "fig.png").write_bytes(b"\x89PNG")
    before = snapshot(out)
    for argv in (["-p", "steps", "-1"], ["-p", "bogus", "1"], ["-p", "lr", "x"],
                 ["--profile", "paper"], ["-p", "out_dir", "x"]):
        assert main(["00_toy", "--root", str(root), "--profile", "ci", *argv]) == 2
        assert capsys.readouterr().err.startswith("diem-run: error: ")
        assert snapshot(out) == before
    fresh = root / "fresh"
    assert main(["00_toy", "--root", str(root), "--out", str(fresh), "-p", "steps", "0"]) == 2
    assert main(["nothing", "--root", str(root), "--out", str(fresh)]) == 2
    assert "available: 00_toy" in capsys.readouterr().err
    assert not fresh.exists()


def test_list_and_check(root, capsys):
    assert main(["--list", "--root", str(root)]) == 0
    assert "00_toy  (profiles: ci, laptop)" in capsys.readouterr().out
    assert main(["00_toy", "--list", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "steps" in out and "int" in out and "256" in out and "sampler steps (> 0)" in out
    assert "one of: tweedie, zero, sigma, prior" in out
    assert main(["00_toy", "--root", str(root), "--profile", "ci", "-p", "tag", "x",
                 "--check"]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out)["tag"] == "x" and "params/00_toy/ci.yaml <- -p tag x" in out
    assert not (root / "outputs").exists()


def test_negative_numbers_are_values(root, capsys):
    """`-p var_y -1e-4` reaches validation: argparse (< 3.13) took -1e-4 for an option."""
    for value in ("-1e-4", "-1E+3", "-.5", "-2", "-1.", "-.inf"):
        assert main(["00_toy", "--root", str(root), "--profile", "ci", "-p", "lr", value,
                     "--check"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("diem-run: error: ") and "lr" in err and "(> 0" in err, err
        assert "usage:" not in err
    assert main(["00_toy", "--root", str(root), "--profile", "ci", "-p", "tag", "-1e-4",
                 "-p", "cg_iters", "-0", "--check"]) == 0
    checked = yaml.safe_load(capsys.readouterr().out)
    assert checked["tag"] == "-1e-4" and checked["cg_iters"] == 0
    with pytest.raises(SystemExit) as e:  # not a number: argparse's error, with a hint
        main(["00_toy", "--root", str(root), "-p", "tag", "-x", "--check"])
    assert e.value.code == 2
    assert "a VALUE that starts with '-' must be a number" in capsys.readouterr().err


def test_help_mentions_the_options(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for option in ("--profile", "-p KEY VALUE", "--out", "--list", "--check", "--params"):
        assert option in out


def test_run_writes_notebook_and_params(root):
    out = root / "outputs" / "00_toy" / "ci"
    out.mkdir(parents=True)
    (out / "earlier.txt").write_text("kept")
    argv = ["00_toy", "--root", str(root), "--profile", "ci", "-p", "covariance", "sigma",
            "--no-progress"]
    assert main(argv) == 0
    assert (out / "earlier.txt").read_text() == "kept"
    written = yaml.safe_load((out / "params.yaml").read_text())
    assert written == {"steps": 8, "lr": 0.01, "cg_iters": 3, "covariance": "sigma",
                       "verbose": False, "laps": [0, 1], "n_samples": 1024, "tag": "run"}
    nb = nbformat.read(out / "00_toy.ipynb", as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert f'out_dir = "{out}"' in injected[0].source
    assert nb.metadata.kernelspec.name == "python3"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["covariance"] == "sigma" and metrics["laps"] == [0, 1]
    assert metrics["cwd"] == str(root)  # the notebook runs in the repository root
    # params.yaml is itself a params file that reproduces the run
    again = resolve("00_toy", None, params_path=out / "params.yaml", root=root)
    assert again.values == written
    # the runner's record: the command reruns it (same values, same out dir), when, how long, where
    record = metrics["run"]
    assert record["command"] == "diem-run 00_toy --profile ci -p covariance sigma"
    rerun = runner._parser().parse_args(shlex.split(record["command"])[1:])
    replayed = resolve(rerun.notebook, rerun.profile, rerun.parameter, rerun.params, rerun.out, root)
    assert replayed.values == written and replayed.out_dir == out.resolve()
    assert datetime.fromisoformat(record["finished"]).tzinfo is not None
    assert 0 < record["wall_time_s"] < 600
    assert record["machine"]["cpus"] == os.cpu_count() and record["machine"]["processor"]
    assert record["machine"]["jax_devices"] is None  # the toy notebook prints no devices


@pytest.mark.parametrize("sources, run_name, out, expected", [
    (["notebooks/02_x.py"], "default", None, "diem-run 02_x --defaults"),
    (["notebooks/02_x.py", "params/02_x/laptop.yaml", "-p seeds 4", "-p laps [0, 1]"], "laptop",
     Path("/tmp/o"), "diem-run 02_x --profile laptop -p seeds 4 -p laps '[0, 1]' --out /tmp/o"),
    (["notebooks/02_x.py", "runs/mine.yaml"], "mine", None, "diem-run 02_x --params runs/mine.yaml"),
    (["notebooks/02_x.py", "params/02_x/paper.yaml"], "big", None,
     "diem-run 02_x --params params/02_x/paper.yaml --profile big"),
])
def test_command_line(sources, run_name, out, expected):
    assert runner.command_line("02_x", sources, run_name, out) == expected


def test_run_record_reads_the_devices_the_notebook_printed(root):
    plan = resolve("00_toy", "ci", [("steps", "4")], root=root)
    executed = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(outputs=[
        nbformat.v4.new_output("stream", name="stdout",
                               text="[CudaDevice(id=0), CudaDevice(id=1)] 3 seeds\n")])])
    record = runner._run_record(plan, executed, 12.34)
    assert record["machine"]["jax_devices"] == "CudaDevice(id=0), CudaDevice(id=1)"
    assert record["wall_time_s"] == 12.3
    assert record["command"] == "diem-run 00_toy --profile ci -p steps 4"  # the default out dir
    elsewhere = runner._run_record(replace(plan, out_dir=root / "x"), executed, 1.0)
    assert elsewhere["command"].endswith(f"--out {root / 'x'}")


def test_run_records_the_programs_the_kernel_compiled(root):
    """A last cell, tagged `injected-compilation`, prints what the kernel compiled and adds it to
    metrics.json (`diemlib.compilation`)."""
    out = root / "out"
    assert main(["00_toy", "--root", str(root), "--profile", "ci", "--out", str(out), "--no-progress"]) == 0
    last = nbformat.read(out / "00_toy.ipynb", as_version=4).cells[-1]
    assert last.metadata["tags"] == ["injected-compilation"]
    assert "programs compiled" in "".join(o.get("text", "") for o in last.outputs)
    compilation = json.loads((out / "metrics.json").read_text())["compilation"]
    assert set(compilation) == {"compiled", "loaded", "seconds", "cache"}


def test_failing_notebook_exits_1_and_keeps_its_record(root, capsys):
    write_notebook(root, "01_fail", "x = 1  # x")
    path = root / "notebooks" / "01_fail.py"
    path.write_text(path.read_text() + "\n# %%\nraise ValueError('broken on purpose')\n")
    out = root / "out"
    assert main(["01_fail", "--root", str(root), "--defaults", "--out", str(out),
                 "--no-progress"]) == 1
    assert "ValueError: broken on purpose" in capsys.readouterr().err
    assert (out / "params.yaml").is_file() and (out / "01_fail.ipynb").is_file()


# papermill's last request is kernel_info; answering it slowly widens the window in which
# jupyter_client's SIGINT at shutdown used to land in a handler ("KeyboardInterrupt caught").
SLOW_KERNEL_INFO = """
# %%
import time
_kernel = get_ipython().kernel
_answer = _kernel.shell_handlers["kernel_info_request"]


async def _slowly(*args, **kwargs):
    await _answer(*args, **kwargs)
    time.sleep(2)


_kernel.shell_handlers["kernel_info_request"] = _slowly
"""


def test_successful_run_is_quiet_and_labelled(root, capfd):
    """No kernel warnings or errors on a successful run; the profile's note is printed and
    written into metrics.json."""
    path = root / "notebooks" / "00_toy.py"
    path.write_text(path.read_text() + SLOW_KERNEL_INFO)
    out = root / "out"
    assert main(["00_toy", "--root", str(root), "--profile", "ci", "--out", str(out),
                 "--no-progress"]) == 0
    captured = capfd.readouterr()
    log = captured.out + captured.err
    for noise in ("IPKernelApp", "WARNING", "ERROR", "KeyboardInterrupt", "without encryption"):
        assert noise not in log, log
    assert f"diem-run: ci: {runner.PROFILE_NOTES['ci']}" in captured.err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["profile"] == "ci" and "noise" in metrics["profile_note"]
    assert metrics["steps"] == 8  # what the notebook wrote is kept


def test_write_metrics(tmp_path):
    np = pytest.importorskip("numpy")
    runner.write_metrics(tmp_path, {"fid": np.float32(5.5)}, curve=np.arange(3))
    data = runner.write_metrics(tmp_path, sinkhorn=[float("nan"), 1.0])
    assert data == {"fid": 5.5, "curve": [0, 1, 2], "sinkhorn": ["nan", 1.0]}
    assert json.loads((tmp_path / "metrics.json").read_text()) == data


def cell_sources(path: Path) -> list[tuple[str, str]]:
    """(type, source) of each cell, as jupytext reads the file (.py or .ipynb)."""
    return [(c.cell_type, c.source.strip()) for c in jupytext.read(str(path)).cells]


def test_pair_comparison_detects_drift(tmp_path):
    py = tmp_path / "00_toy.py"
    shutil.copy(FIXTURES / "notebooks" / "00_toy.py", py)
    jupytext.write(jupytext.read(str(py)), str(py.with_suffix(".ipynb")))
    assert cell_sources(py) == cell_sources(py.with_suffix(".ipynb"))
    py.write_text(py.read_text().replace("steps = 256", "steps = 128"))
    assert cell_sources(py) != cell_sources(py.with_suffix(".ipynb"))


# ------------------------------------------------------------------ the workbook itself


def _ids(paths):
    return [p.stem if p.suffix == ".py" else f"{p.parent.name}/{p.stem}" for p in paths]


@pytest.mark.parametrize("py", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_has_ipynb_pair(py):
    assert py.with_suffix(".ipynb").is_file(), f"run `make sync` to create {py.stem}.ipynb"


@pytest.mark.parametrize("py", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_pair_in_sync(py):
    ipynb = py.with_suffix(".ipynb")
    if not ipynb.is_file():
        pytest.skip("no .ipynb (see test_notebook_has_ipynb_pair)")
    assert cell_sources(py) == cell_sources(ipynb), f"run `make sync` ({py.stem} drifted)"


@pytest.mark.parametrize("py", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_declares_parameters(py):
    params = notebook_parameters(read_notebook(py), py.stem)
    assert "out_dir" in params, "declare out_dir (a str) in the parameters cell"
    assert params["out_dir"].type is str
    missing_help = [k for k, p in params.items() if not p.help]
    assert not missing_help, f"parameters without a help comment: {missing_help}"
    runner.validate(params, [], py.stem)  # the defaults satisfy their own constraints


@pytest.mark.parametrize("py", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_has_every_profile(py):
    have = runner.list_profiles(py.stem, ROOT)
    assert set(runner.PROFILES) <= set(have), f"params/{py.stem}/ has only {have}"


@pytest.mark.parametrize("py", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_says_its_scale(py):
    """Run All uses the defaults, the quick interactive scale: the first Markdown cell says so
    and how to get the paper's configuration."""
    first = next(c.source for c in jupytext.read(str(py)).cells if c.cell_type == "markdown")
    for needed in ("defaults", "--profile paper"):
        assert needed in first, f"the first Markdown cell of {py.name} does not mention {needed!r}"


@pytest.mark.parametrize("py", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_paper_profile_pins_every_scale_knob(py):
    """paper.yaml sets every parameter another profile sets: the defaults are the interactive
    scale, and changing one of them must not change the paper's configuration."""
    files = {p: runner.read_params_file(ROOT / "params" / py.stem / f"{p}.yaml")
             for p in runner.list_profiles(py.stem, ROOT)}
    turned = set().union(*(set(v) for p, v in files.items() if p != "paper"))
    missing = sorted(turned - set(files.get("paper", {})))
    assert not missing, f"params/{py.stem}/paper.yaml does not set {missing}"


@pytest.mark.parametrize("path", PARAM_FILES, ids=_ids(PARAM_FILES))
def test_params_file_validates(path):
    resolve(path.parent.name, path.stem, root=ROOT)


CI_RUNS = [p for p in NOTEBOOKS if (ROOT / "params" / p.stem / "ci.yaml").is_file()]


def fake_cifar10(folder: Path, per_batch: int = 16) -> Path:
    """CIFAR-10's binary layout (5 training batches and a test batch of `per_batch` random
    smooth images each), so that notebook 03 runs its ci profile without the real data set."""
    rng = np.random.default_rng(0)
    root = folder / "cifar-10-batches-bin"
    root.mkdir(parents=True)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        coarse = rng.integers(0, 256, (per_batch, 3, 4, 4))
        images = np.repeat(np.repeat(coarse, 8, axis=2), 8, axis=3).astype(np.uint8)
        labels = rng.integers(0, 10, (per_batch, 1), dtype=np.uint8)
        (root / name).write_bytes(np.concatenate([labels, images.reshape(per_batch, -1)], axis=1).tobytes())
    return root


# Data a notebook's ci run needs, made by the test (the real data sets are never downloaded);
# notebook 04 runs on the brain template that ships with nilearn, with no data/ folder at all.
CI_DATA = {
    "03_cifar10": lambda tmp: ["-p", "cifar10", str(fake_cifar10(tmp))],
    "05_mmps_evaluation": lambda tmp: ["-p", "cifar10", str(fake_cifar10(tmp))],
}


@pytest.mark.slow
@pytest.mark.parametrize("py", CI_RUNS, ids=_ids(CI_RUNS))
def test_notebook_runs_at_ci_profile(py, tmp_path):
    """The notebook runs at `ci`, and `make report` builds its section of the results page from
    the run's real outputs: every number it reads is there, and the figures it shows are copied (a
    `ci` run may skip some, as 05 skips tasks)."""
    out = tmp_path / "outputs" / py.stem / "ci"
    data = CI_DATA.get(py.stem, lambda tmp: [])(tmp_path / "data")
    assert main([py.stem, "--root", str(ROOT), "--profile", "ci", "--out", str(out),
                 "--no-progress", *data]) == 0
    assert (out / f"{py.stem}.ipynb").is_file() and (out / "params.yaml").is_file()
    assert (out / "metrics.json").is_file(), "a notebook writes metrics.json into out_dir"
    if py.stem == "04_mri":  # no data given: the template that ships with nilearn, labelled as such
        assert "MNI152 template" in json.loads((out / "metrics.json").read_text())["summary"]["data"]
    page = report.write_report(ROOT, tmp_path / "outputs", tmp_path / "docs", "ci").read_text()
    section = page[page.index(f"## {py.stem}"):].split("\n## ")[0]
    assert "### The paper and this run" in section and "lacks what this page reads" not in section
    assert f"**Run it again:** `.venv/bin/diem-run {py.stem} --profile ci" in section
    figures = list((tmp_path / "docs" / "results" / py.stem).glob("*.png"))
    assert figures and all(f"results/{py.stem}/{f.name}" in section for f in figures)
