"""The persistent compilation cache and the count of programs built (`diemlib.compilation`).

Each scenario runs in fresh processes, since a process decides once whether it uses the cache:
where the cache goes (`DIEMLIB_COMPILATION_CACHE`, XDG), off, an unwritable directory (one
warning, the run goes on), programs with host callbacks (written, then loaded by another process
with that process's callbacks), two processes filling one directory at once, and a DiEM run
loading every program of a lap from the cache that an earlier run filled.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest

from diemlib.compilation import CACHE_VARIABLE, Compilations, cache_directory, compilations

ROOT = Path(__file__).resolve().parents[1]

# A program with a host callback per step (as the samplers' progress ticks), then the counts.
PROGRAM = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp
    import diemlib
    from diemlib.compilation import compilations

    seen = []

    @jax.jit
    def f(x):
        def body(c, _):
            jax.debug.callback(lambda v: seen.append(float(v)), c[0])
            return 2 * c, None
        return jax.lax.scan(body, x, None, length=4)[0]

    before = compilations()
    out = f(jnp.ones(3) * float(sys.argv[1]))
    jax.effects_barrier()
    built = compilations() - before
    print(json.dumps({"out": out.tolist(), "seen": seen, "compiled": built.compiled, "loaded": built.loaded}))
""")


def python(code: str, cache, *args, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, CACHE_VARIABLE: str(cache)}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True,
                          check=False, cwd=ROOT, **kwargs)


def run_program(cache, scale=1) -> dict:
    done = python(PROGRAM, cache, scale)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_cache_directory_follows_the_variable_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_VARIABLE, str(tmp_path / "here"))
    assert cache_directory() == tmp_path / "here"
    for off in ("0", "off", "OFF", "false", "no"):
        monkeypatch.setenv(CACHE_VARIABLE, off)
        assert cache_directory() is None
    monkeypatch.delenv(CACHE_VARIABLE)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    chosen = jax.config.jax_compilation_cache_dir  # what JAX was given comes next: this process's
    assert chosen is None or cache_directory() == Path(chosen)
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        assert cache_directory() == tmp_path / "xdg" / "diemlib" / "jax"
        monkeypatch.delenv("XDG_CACHE_HOME")
        assert cache_directory() == Path.home() / ".cache" / "diemlib" / "jax"
    finally:
        jax.config.update("jax_compilation_cache_dir", chosen)


def test_compilations_subtract():
    assert Compilations(5, 2, 3.0) - Compilations(1, 2, 1.0) == Compilations(4, 0, 2.0)
    assert isinstance(compilations(), Compilations)


def test_a_program_with_host_callbacks_is_loaded_by_the_next_process_with_its_callbacks(tmp_path):
    """The first process compiles and writes the program; the next loads it (compiles nothing)
    and its callback runs in that process, with that process's values."""
    first = run_program(tmp_path / "cache")
    assert first["compiled"] >= 1 and first["seen"] == [1.0, 2.0, 4.0, 8.0]
    assert any(p.name.startswith("jit_f-") for p in (tmp_path / "cache").iterdir())
    second = run_program(tmp_path / "cache", scale=3)
    assert (second["compiled"], second["loaded"]) == (0, first["compiled"] + first["loaded"])
    assert second["seen"] == [3.0, 6.0, 12.0, 24.0] and second["out"] == [48.0] * 3


def test_cache_off_writes_nothing(tmp_path):
    result = run_program("off")
    assert result["loaded"] == 0 and result["compiled"] >= 1
    code = "import diemlib, jax; print(jax.config.jax_enable_compilation_cache)"
    assert python(code, "0").stdout.strip() == "False"


def test_an_unwritable_directory_warns_once_and_the_run_goes_on(tmp_path):
    """A cache below a file cannot be created (as root too): one warning, the program runs."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = python(PROGRAM, blocker / "cache", 1)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["seen"] == [1.0, 2.0, 4.0, 8.0]
    warnings = [line for line in done.stderr.splitlines() if "CompilationCacheWarning" in line]
    assert len(warnings) == 1, done.stderr
    assert "not writable" in warnings[0] and CACHE_VARIABLE in warnings[0]


def test_two_processes_fill_one_cache_at_once(tmp_path):
    """Two processes compiling the same programs into one directory at the same time: both run
    without a warning, and a third loads everything."""
    env = {**os.environ, CACHE_VARIABLE: str(tmp_path / "cache")}
    runs = [subprocess.Popen([sys.executable, "-c", PROGRAM, "1"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
        assert "Warning" not in err, err
        assert json.loads(out.splitlines()[-1])["seen"] == [1.0, 2.0, 4.0, 8.0]
    third = run_program(tmp_path / "cache")
    assert third["compiled"] == 0 and third["loaded"] >= 1


@pytest.mark.slow
def test_a_rerun_of_diem_loads_every_program_from_the_cache(tmp_path):
    """tests/tiny_em.py, 3 laps, twice with one fresh cache: the first run compiles in laps 0 and
    1 (the network's E-step) and builds nothing in lap 2; the second compiles nothing in any lap
    and gives the same numbers."""
    runs = []
    for name in ("first", "second"):
        done = subprocess.run([sys.executable, str(ROOT / "tests" / "tiny_em.py"), str(tmp_path / name), "--laps", "3"],
                              env={**os.environ, CACHE_VARIABLE: str(tmp_path / "cache")}, capture_output=True,
                              text=True, check=False, cwd=ROOT)
        assert done.returncode == 0, done.stderr
        laps = json.loads((tmp_path / name / "metrics.json").read_text())["laps"]
        runs.append((json.loads(done.stdout.splitlines()[-1]), laps))
    (first, first_laps), (second, second_laps) = runs
    assert first_laps[0]["compiles"] > 0 and first_laps[1]["compiles"] > 0
    assert first_laps[2]["compiles"] == first_laps[2]["cache_loads"] == 0
    assert [lap["compiles"] for lap in second_laps] == [0, 0, 0]
    assert second_laps[0]["cache_loads"] > 0
    assert second["metrics"] == first["metrics"] and second["samples"] == first["samples"]
