"""Multi-process runs (`diemlib.em.distributed`): the environment that asks for them, and a tiny
DiEM lap run by two CPU processes on localhost (JAX's gloo collectives) against one process.

The two-process run splits every E-step batch and every M-step batch over the two processes'
devices; only process 0 writes the run directory. Its q0, posterior samples, weights and metrics
must equal the one-process run's up to float32 round-off (as `test_sharding_two_devices_same_result`
checks for two devices of one process). Run again in the same directory, both processes resume
from process 0's checkpoints (read by process 0, broadcast to process 1) with the same metrics.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from diemlib.em import distributed
from diemlib.workbook import runner

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 900  # seconds, per run of tiny_em.py (a 2-core machine shared with other jobs)


def test_requested_reads_explicit_variables_and_slurm():
    assert distributed.requested({}) is None
    explicit = {"DIEMLIB_COORDINATOR": "node0:1234", "DIEMLIB_NUM_PROCESSES": "4", "DIEMLIB_PROCESS_ID": "3"}
    assert distributed.requested(explicit) == ("explicit", 4, 3)
    assert distributed.process_id_from_env(explicit) == 3
    assert distributed.requested({**explicit, "DIEMLIB_NUM_PROCESSES": "1", "DIEMLIB_PROCESS_ID": "0"}) is None
    with pytest.raises(ValueError, match="need all of"):
        distributed.requested({"DIEMLIB_NUM_PROCESSES": "2"})
    with pytest.raises(ValueError, match="not in"):
        distributed.requested({**explicit, "DIEMLIB_PROCESS_ID": "4"})
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "8",
             "SLURM_PROCID": "5", "SLURM_LOCALID": "1"}
    assert distributed.requested(slurm) == ("slurm", 8, 5)
    assert distributed.requested({**slurm, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    assert distributed.initialize() is False  # this process: one alone, nothing started


def clear_variables(monkeypatch):
    """No DIEMLIB_* variables, and whatever the test sets is undone after it."""
    for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
        monkeypatch.setenv(name, "")  # records the variable's state for monkeypatch's undo
        monkeypatch.delenv(name)


def test_runner_options_set_the_variables(monkeypatch):
    clear_variables(monkeypatch)
    assert runner.main(["01", "--check", "--coordinator", "h:1", "--num-processes", "2", "--process-id", "1",
                        "--profile", "ci"]) == 0
    assert distributed.requested() == ("explicit", 2, 1)
    monkeypatch.delenv(distributed.ENV_COORDINATOR)
    assert runner.main(["01", "--check", "--profile", "ci"]) == 2  # incomplete: refused


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(out: Path, log: Path, extra: dict) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "JAX_ENABLE_X64") and not k.startswith(("SLURM_", "DIEMLIB_"))}
    env.update(JAX_PLATFORMS="cpu", **extra)
    return subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "tiny_em.py"), str(out)], env=env, cwd=ROOT,
        stdout=subprocess.PIPE, stderr=log.open("w"), text=True, start_new_session=True,
    )


def finish(procs: dict, logs: dict) -> dict:
    """Waits for every process (killing them all on a failure or a timeout); their last JSON lines."""
    results = {}
    try:
        deadline = time.monotonic() + TIMEOUT
        for name, proc in procs.items():
            out, _ = proc.communicate(timeout=max(1, deadline - time.monotonic()))
            assert proc.returncode == 0, (name, logs[name].read_text()[-3000:])
            results[name] = json.loads(out.strip().splitlines()[-1])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return results


def two_processes(out: Path, logs: Path, tag: str) -> dict:
    coordinator = f"127.0.0.1:{free_port()}"
    procs, log_files = {}, {}
    for i in range(2):
        log_files[i] = logs / f"{tag}-process{i}.log"
        procs[i] = start(out, log_files[i], {
            "DIEMLIB_COORDINATOR": coordinator, "DIEMLIB_NUM_PROCESSES": "2", "DIEMLIB_PROCESS_ID": str(i),
            "DIEMLIB_INIT_TIMEOUT": "300", "DIEMLIB_HEARTBEAT_TIMEOUT": "60",
        })
    return finish(procs, log_files)


@pytest.mark.slow
def test_two_processes_same_result_as_one(tmp_path):
    """tests/tiny_em.py (1 lap, float32) as one process and as two processes of one CPU device
    each (measured: max relative differences ~1e-6, like two devices of one process)."""
    one = finish({"one": start(tmp_path / "one", tmp_path / "one.log", {})}, {"one": tmp_path / "one.log"})["one"]
    two = two_processes(tmp_path / "two", tmp_path, "fresh")
    assert one["process_count"] == 1 and one["device_count"] == 1
    assert two[0]["process_count"] == 2 and two[0]["device_count"] == two[1]["device_count"] == 2
    assert "samples" not in two[1]  # process 1 wrote nothing, printed its metrics only
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert not list((tmp_path / "two").glob(".*"))

    differences = {}
    for name in ("q0_mean", "q0_cov", "samples", "mean", "weights"):
        a, b = np.asarray(one[name]), np.asarray(two[0][name])
        differences[name] = float(np.abs(a - b).max() / np.abs(a).max())
    print("max relative differences, 1 vs 2 processes:", differences)
    assert all(d < 1e-5 for d in differences.values()), differences

    m1, m2 = one["metrics"], two[0]["metrics"]
    assert two[1]["metrics"] == m2  # both processes return the same metrics
    assert len(m1["laps"]) == len(m2["laps"]) == 1
    for a, b in zip(m1["laps"] + m1["q0"]["iterations"], m2["laps"] + m2["q0"]["iterations"]):
        assert a.keys() == b.keys()
        assert a["iterations"] == b["iterations"]
        np.testing.assert_allclose(a["residual"], b["residual"], rtol=0, atol=1e-6)
        if "loss" in a:
            print(f"lap 0 loss: one process {a['loss']:.8g}, two {b['loss']:.8g}")
            np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    a, b = np.asarray(one["network_samples"]), np.asarray(two[0]["network_samples"])
    rows = np.abs(a - b).max(axis=1)
    print(f"network-prior E-step: median row difference {np.median(rows):.2e}, max {rows.max():.2e}")
    assert np.median(rows) < 1e-5 and rows.max() < 1e-2

    # The same command again: both processes resume from process 0's checkpoints (nothing left
    # to run) and return the metrics process 0 read.
    files = {p.name: p.read_bytes() for p in (tmp_path / "two").iterdir()}
    again = two_processes(tmp_path / "two", tmp_path, "resumed")
    assert again[0]["metrics"] == again[1]["metrics"] == m2
    assert again[0]["samples"] == two[0]["samples"] and again[0]["weights"] == two[0]["weights"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "two").iterdir()} == files


def test_runner_adds_the_initialize_cell_and_keeps_other_processes_out_of_the_out_dir(monkeypatch, tmp_path):
    executed = []
    monkeypatch.setattr(runner, "_execute", lambda plan, progress, log_output: executed.append(
        (plan, plan.out_dir.is_dir())) or plan.out_dir)
    plan = runner.resolve("01", "ci", out=tmp_path / "out")
    first = plan.nb.cells[0].source
    clear_variables(monkeypatch)
    runner.run(plan)  # one process: the notebook as it is
    assert executed[-1][0].nb.cells[0].source == first

    monkeypatch.setenv(distributed.ENV_COORDINATOR, "127.0.0.1:1")
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "2")
    for index in (0, 1):
        monkeypatch.setenv(distributed.ENV_PROCESS_ID, str(index))
        runner.run(plan)
        ran, existed = executed[-1]
        assert ran.nb.cells[0].metadata["tags"] == ["injected-distributed"]
        assert "initialize()" in ran.nb.cells[0].source and ran.nb.cells[1].source == first
        assert (ran.out_dir == plan.out_dir) == (index == 0)
        assert existed == (index == 1)  # process 1: a temporary directory, removed afterwards
    assert not ran.out_dir.exists() and plan.nb.cells[0].source == first
    assert not (tmp_path / "out").exists()  # nothing was written by these (stubbed) runs
