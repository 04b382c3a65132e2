"""Compile once: each notebook's `ci` run twice in a row on one fresh compilation cache.

XLA compiling the programs of a notebook (samplers around a U-Net and MMPS, the M-step) was most
of a `ci` run's wall time, paid again on every run. With the persistent compilation cache
(`diemlib.compilation`) the first run compiles and writes them, the second loads them. For each
notebook this runs `diem-run NB --profile ci` twice into fresh output directories with one fresh
cache directory (`DIEMLIB_COMPILATION_CACHE`), on data made as `tests/test_runner.py` makes it
(CIFAR-10 and a brain volume are not downloaded), and prints per run the wall time, the programs
XLA compiled and those loaded from the cache (the kernel's totals, `metrics.json`'s
`compilation`), and for EM notebooks the programs each lap built (`compiles` + `cache_loads`):
a lap that reuses the programs of the lap before builds none. Two checks go beyond `ci`'s
values: notebook 04 runs 2 laps (its `ci` has 1), and notebook 05 runs 3 and 6 sampler steps
(`ci`: 3), for which it prints the most programs any (method, task) compiled (those measured with
a compile time: a reused program costs none).

Run: `make bench` or `python benchmarks/bench_compile.py [--notebooks 03 05] [--keep DIR]`.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_runner import CI_DATA  # noqa: E402  the data the ci runs of the tests use

NOTEBOOKS = ["01_manifold", "02_tweedie_covariance", "03_cifar10", "04_mri", "05_mmps_evaluation"]
# Beyond ci: a second lap for 04 (to see it reuse the first lap's programs), two step counts for 05.
EXTRA = {"04_mri": ["-p", "laps", "2"], "05_mmps_evaluation": ["-p", "steps", "[3, 6]"]}


def run(notebook: str, out: Path, cache: Path, data: list[str], log: Path) -> dict:
    """One `diem-run` at profile ci; its wall time, load averages and `metrics.json`."""
    command = [sys.executable, "-m", "diemlib.workbook.runner", notebook, "--profile", "ci", "--out", str(out),
               "--no-progress", *data, *EXTRA.get(notebook, [])]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with log.open("w") as file:
        done = subprocess.run(command, cwd=ROOT, env={**os.environ, "DIEMLIB_COMPILATION_CACHE": str(cache)},
                              stdout=file, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - start
    metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else {}
    return {"ok": done.returncode == 0, "wall": wall, "load": (load, os.getloadavg()[0]), "metrics": metrics}


def lap_programs(metrics: dict) -> str:
    """Programs built in each lap (compiled + loaded), e.g. `5+0 1+0`; `-` for notebooks without laps."""
    laps = metrics.get("laps")
    if not isinstance(laps, list) or not laps or "compiles" not in laps[0]:
        return "-"
    return " ".join(f"{lap['compiles']}+{lap['cache_loads']}" for lap in laps)


def sampler_programs(metrics: dict) -> str:
    """Notebook 05: the most programs one (method, task) compiled over the step counts (timed compiles)."""
    results = metrics.get("results")
    if not isinstance(results, dict):
        return "-"
    counts = [sum(row[name]["compile_s"] > 0.05 for row in by_steps.values())
              for by_steps in results.values() for name in next(iter(by_steps.values()))]
    return f"{max(counts)} of {len(next(iter(results.values())))} step counts"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--notebooks", nargs="+", default=NOTEBOOKS, help="notebooks (stems or prefixes)")
    parser.add_argument("--keep", type=Path, help="work in DIR and keep it (outputs, caches, logs)")
    args = parser.parse_args(argv)
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_compile-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} CPUs; work directory {work}; beyond ci: {EXTRA}", flush=True)
    rows = []
    for prefix in args.notebooks:
        notebook = next(nb for nb in NOTEBOOKS if nb.startswith(prefix))
        cache = work / notebook / "cache"
        for fresh in (cache, work / notebook / "data"):
            shutil.rmtree(fresh, ignore_errors=True)
        cache.mkdir(parents=True)
        data = CI_DATA.get(notebook, lambda folder: [])(work / notebook / "data")
        runs = []
        for name in ("first", "second"):
            out = work / notebook / name
            shutil.rmtree(out, ignore_errors=True)
            result = run(notebook, out, cache, data, work / notebook / f"{name}.log")
            built = result["metrics"].get("compilation", {})
            print(f"{notebook}, {name} run: {'ok' if result['ok'] else 'FAILED, see ' + str(work / notebook / name) + '.log'}, "
                  f"{result['wall']:.0f} s, load {result['load'][0]:.1f} -> {result['load'][1]:.1f}, "
                  f"compiled {built.get('compiled')} ({built.get('seconds', 0):.0f} s), loaded {built.get('loaded')}, "
                  f"per lap {lap_programs(result['metrics'])}", flush=True)
            runs.append((result, built))
        rows.append((notebook, runs))
    print("\n| notebook | first run: wall s | compiled | loaded | second run: wall s | compiled | loaded | second / first "
          "| programs per lap, first run (compiled+loaded) | sampler programs per (method, task) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for notebook, ((first, a), (second, b)) in rows:
        print(f"| {notebook} | {first['wall']:.0f} | {a.get('compiled')} | {a.get('loaded')} | {second['wall']:.0f} "
              f"| {b.get('compiled')} | {b.get('loaded')} | {second['wall'] / first['wall']:.2f} "
              f"| {lap_programs(first['metrics'])} | {sampler_programs(first['metrics'])} |")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
