"""The notebooks' shared tooling: claims checked on a run's numbers, the diverged-lap marks."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from diemlib.workbook.claims import Claims
from diemlib.workbook.plots import log_axis, mark_diverged, mark_unresolved


def test_claims_record_print_and_count(capsys):
    claims = Claims()
    claims.check("the posterior mean beats zero-filled at R = 4", 22.7 > 19.2, "22.70 vs 19.20 dB")
    claims.check("the last lap beats q0", 11.0 > 16.8, "q0 16.80, lap 2 11.00 dB")
    out = capsys.readouterr().out
    assert "✓ the posterior mean beats zero-filled at R = 4: holds (22.70 vs 19.20 dB)" in out
    assert "✗ the last lap beats q0: does NOT hold in this run (q0 16.80, lap 2 11.00 dB)" in out
    assert claims.results["the last lap beats q0"] == {"holds": False, "evidence": "q0 16.80, lap 2 11.00 dB"}
    assert claims.summary() == "1 of 2 claims hold in this run"


def test_mark_diverged_shades_the_laps_above_one_on_every_panel():
    history = [{"lap": 0, "residual": 0.48}, {"lap": 1, "residual": 12.96}, {"lap": 2, "residual": float("nan")}]
    fig, axes = plt.subplots(1, 3)
    assert mark_diverged(axes, history) == [1, 2]
    for ax in axes:
        assert len(ax.patches) == 2  # one band per diverged lap
    assert axes[0].get_legend_handles_labels()[1] == ["E-step solve diverged"]
    plt.close(fig)
    fig, axes = plt.subplots(1, 2)
    assert mark_diverged(axes, history[:1]) == [] and not axes[0].patches
    plt.close(fig)


def test_mark_unresolved_only_when_every_value_sits_at_the_floor():
    fig, (a, b) = plt.subplots(1, 2)
    assert mark_unresolved(a, [1e-6, 1e-6, 1e-6], 1e-6, 16) == (
        "at the estimator's floor 1e-06 for q0 and every lap: not resolved with 16 samples")
    assert "not resolved with 16 samples" in a.texts[0].get_text()
    assert mark_unresolved(b, [1e-6, 43.9, 1e-6], 1e-6, 16) is None and not b.texts
    plt.close(fig)


def test_log_axis_labels_a_few_round_values_whatever_the_span():
    fig, axes = plt.subplots(1, 3)
    for ax, (low, high) in zip(axes, [(0.033, 0.071), (0.2, 40.0), (0.02, 0.095)]):
        ax.plot([low, high], [0, 1], "o")
        log_axis(ax)
    labels = [[t.get_text() for t in ax.get_xticklabels()] for ax in axes]
    assert labels[0] == ["0.04", "0.05", "0.06"]  # under a decade: finer steps, no minor labels
    assert labels[1][:4] == ["0.2", "0.5", "1", "2"] and "20" in labels[1]
    assert labels[2] == ["0.02", "0.05", "0.1"]
    assert all(not t.get_text() for ax in axes for t in ax.get_xminorticklabels())
    plt.close(fig)
