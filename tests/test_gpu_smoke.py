"""`benchmarks/gpu_smoke.py --tiny`, the CPU form of `make gpu-smoke`: every notebook's lap runs and is timed."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("01_manifold", "03_cifar10", "04_mri", "05_mmps_evaluation")


@pytest.mark.slow
def test_tiny_lap_of_every_notebook():
    # float32 as the script runs it, and unoptimised XLA code: it compiles about three times faster.
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
    run = subprocess.run([sys.executable, "benchmarks/gpu_smoke.py", "--tiny"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("device: ")
    rows = {line.split()[0]: line.split() for line in run.stdout.splitlines() if line.startswith(NOTEBOOKS)}
    assert list(rows) == list(NOTEBOOKS), run.stdout
    for name, row in rows.items():
        # name params | batch compile samples/s s/step MiB | batch compile steps/s examples/s MiB
        samples_per_s, s_per_step, steps_per_s, examples_per_s = (float(row[i]) for i in (5, 6, 11, 12))
        assert min(samples_per_s, s_per_step, steps_per_s, examples_per_s) > 0, run.stdout
