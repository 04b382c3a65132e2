"""The notebooks' shared tooling: claims checked on a run's numbers, the diverged-lap marks."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from diemlib.workbook.claims import Claims
from diemlib.workbook.plots import mark_diverged, mark_unresolved


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
