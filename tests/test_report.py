"""The results page `make report` (diemlib.workbook.report), built from fake runs.

Each fake run is an `outputs/<notebook>/<profile>/` tree shaped like a real one: the
`params.yaml` that `diem-run` writes for that command (its own `_dump_params`), a `metrics.json`
with the keys the notebook writes (a few laps, made-up numbers) and PNG figures of the notebook's
sizes. No notebook runs.
"""

import json

import pytest

Image = pytest.importorskip("PIL.Image")

from diemlib.workbook import report, runner  # noqa: E402

ROOT = runner.find_root()
STEMS = [p.stem for p in runner.list_notebooks(ROOT)]


def em(q0: dict, laps: list[dict]) -> dict:
    times = {"estep_time": 10.0, "mstep_time": 20.0, "eval_time": 5.0}
    return {"q0": q0, "laps": [{"lap": i, "loss": 0.5, **times, **lap} for i, lap in enumerate(laps)]}


def claims(*verdicts) -> dict:
    return {f"claim {i}": {"holds": holds, "evidence": f"evidence {i}"} for i, holds in enumerate(verdicts)}


def mmps_results() -> dict:
    def row(psnr, f, b):
        return {"psnr": psnr, "psnr_sem": 0.3, "ssim": psnr / 40, "lpips": 0.2, "forward_per_step": f,
                "vjp_per_step": b, "seconds_per_image": 0.5, "peak_mib": 120.0}

    rows = {"DPS": row(18.0, 1.1, 1.0), "ΠGDM": row(19.0, 1.1, 1.0), "TMPD": row(19.5, 1.1, 2.0),
            "DiffPIR": row(20.0, 1.1, 0.0), "MMPS (1)": row(20.5, 1.1, 2.0), "MMPS (5)": row(21.25, 1.1, 6.0)}
    results = {task: {"10": dict(rows)} for task in ("box", "random", "motion", "sr")}
    results["motion"]["10"]["MMPS (5)"] = row(22.5, 1.1, 6.0)  # 5 iterations help most on motion deblurring
    return results


METRICS = {
    "01_manifold": {**em({"sinkhorn": 2.5, "evidence": 0.3}, [{"sinkhorn": 0.9, "evidence": 0.2},
                                                              {"sinkhorn": 0.123456, "evidence": 0.05}]),
                    "unresolved": {}, "claims": claims(True, True)},
    "02_tweedie_covariance": {
        "choices": ["zero", "sigma", "prior", "tweedie"],
        "verdict": [{"sigma": 0.01, "best_heuristic": "sigma", "ratio": 1.5, "tweedie_at_floor": True,
                     "heuristic_at_floor": True, "verdict": "unresolved: the heuristics at the estimator floor"},
                    {"sigma": 0.1, "best_heuristic": "zero", "ratio": 42.0, "tweedie_at_floor": False,
                     "heuristic_at_floor": False, "verdict": "1.6 order of magnitude better"}],
        "fig1_helix": {"sigma": 0.25, "divergence": {"exact": 1e-6, "zero": 0.033, "tweedie": 2e-6}},
        "params": {"seeds": 16}},
    "03_cifar10": {**em({"fid": 358.0, "kid_mean": 0.36, "weights": "converted"},
                        [{"fid": 330.0, "kid_mean": 0.33}, {"fid": 265.4, "kid_mean": 0.246}]),
                   "claims": claims(True, False)},
    "04_mri": {**em({"psnr": 17.0, "ssim": 0.5, "evidence": 0.4}, [{"psnr": 19.12, "ssim": 0.6, "evidence": 0.3}]),
               "study": {str(R): {f"{x} {q}": v for x, v0 in (("zero-filled", 15.6), ("posterior mean", 18.4),
                                                              ("posterior sample", 17.0))
                                  for q, v in (("psnr", v0), ("ssim", v0 / 30))} for R in (4, 32)},
               "summary": {"data": "simulated k-space from the MNI152 template"}, "claims": claims(True)},
    "05_mmps_evaluation": {"results": mmps_results(),
                           "summary": {f"{t}/10": {"best_baseline": "DiffPIR", "psnr_gain": 1.25, "ssim_gain": 0.03,
                                                   "lpips_gain": 0.0} for t in ("box", "random", "motion", "sr")},
                           "claims": claims(True, True, True, True)},
}
FIGURES = {  # name: (width, height), as the notebooks write them at dpi 100
    "01_manifold": {"corner_q0.png": (700, 700), "corner_lap00.png": (700, 700), "corner_lap01.png": (700, 700),
                    "metrics.png": (1600, 350)},
    "02_tweedie_covariance": {"fig1_helix.png": (1000, 450), "fig2_divergence.png": (650, 450)},
    "03_cifar10": {"corruption.png": (800, 240), "samples_q0.png": (800, 340), "samples_lap01.png": (800, 440),
                   "metrics.png": (1600, 350)},
    "04_mri": {"observations.png": (800, 240), "samples_lap00.png": (800, 440), "reconstructions_0.png": (900, 720),
               "quality_vs_R.png": (900, 350), "metrics.png": (2000, 350)},
    "05_mmps_evaluation": {"observations.png": (600, 400), "quality_vs_cost.png": (1600, 700),
                           **{f"samples_{t}.png": (600, 800) for t in ("box", "random", "motion", "sr")}},
}
COMMANDS = {  # -p overrides of each fake run
    "03_cifar10": [("cifar10", "data/cifar10-jpeg.tar.gz")],
    "05_mmps_evaluation": [("cifar10", "data/cifar10-jpeg.tar.gz")],
    "04_mri": [("laps", "1")],
}


def fake_run(outputs, stem, profile, with_run_record=True):
    """`outputs/<stem>/<profile>/` as `diem-run <stem> --profile <profile> -p ...` leaves it."""
    plan = runner.resolve(stem, profile, COMMANDS.get(stem, []), out=outputs / stem / profile, root=ROOT)
    plan.out_dir.mkdir(parents=True)
    (plan.out_dir / "params.yaml").write_text(runner._dump_params(plan))
    metrics = {**METRICS[stem], "profile": profile, "profile_note": runner.PROFILE_NOTES[profile]}
    if with_run_record:
        metrics["run"] = {"command": "diem-run ...", "finished": "2024-12-01T10:00:00+01:00", "wall_time_s": 3693.0,
                          "machine": {"platform": "Linux-x86_64", "processor": "AMD EPYC", "cpus": 2,
                                      "jax_devices": "CpuDevice(id=0)"}}
    (plan.out_dir / "metrics.json").write_text(json.dumps(metrics))
    for name, size in FIGURES[stem].items():
        Image.new("RGB", size, "white").save(plan.out_dir / name)
    return plan.out_dir


@pytest.fixture
def page(tmp_path):
    """The page of five runs: laptop runs of all but 01 (a ci run only, without a run record)."""
    outputs, docs = tmp_path / "outputs", tmp_path / "docs"
    for stem in METRICS:
        fake_run(outputs, stem, "ci" if stem == "01_manifold" else "laptop", with_run_record=stem != "01_manifold")
    stale = docs / "results" / "02_tweedie_covariance" / "old.png"
    stale.parent.mkdir(parents=True)
    Image.new("RGB", (10, 10)).save(stale)
    path = report.write_report(ROOT, outputs, docs, "laptop", max_width=900)
    return path, path.read_text()


def test_page_is_marked_generated_and_names_every_notebook(page):
    path, text = page
    assert path.name == "results.md"
    assert text.startswith("<!-- GENERATED by `make report`") and "do not edit this file by hand" in text
    for stem in STEMS:
        assert f"## {stem}" in text


def test_paper_numbers_ours_and_commands(page):
    _, text = page
    # the paper: Table 1 at the run's rho (laptop: 50 %), Table 4 for MMPS, the cost table
    assert "6.76 after 32 laps" in text and "21.73/0.69/0.23" in text and "MMPS (k) 1F + (k + 1)B" in text
    assert "FID 39.94 with (I + Σ_t⁻¹)⁻¹ and 118.69 with Σ_t" in text and "not run: the ablation is" in text
    # ours
    assert "358.0 (q0) → 265.4 (lap 1)" in text and "KID 0.360 (q0) → 0.246 (lap 1)" in text
    assert "Sinkhorn number to the ground truth 2.5 (q0) → 0.123 (lap 1)" in text
    assert "R = 32: 18.4 vs 15.6 dB" in text and "17.00 dB (q0) → 19.12 dB (lap 0)" in text
    assert "box 21.25/0.53/0.20" in text and "random 23.72/0.75/0.20" in text
    assert "ahead of the best baseline in PSNR at 4 and in SSIM at 4 of 4" in text
    assert "MMPS (1) to MMPS (5): motion at 10 steps (+2.00 dB) | yes |" in text
    assert "Tweedie better than the best heuristic at 1 of 1 resolved σ_t, by ≥ 10× at 1" in text
    assert "yes: medians of 16 experiments" in text and "yes: the same figure, at σ_t = 0.25" in text
    # the scale against the paper profile's, the run record, and the claims checked
    assert "`observations` 1024 (paper 50000)" in text
    assert "2024-12-01T10:00:00+01:00" in text and "1 h 01 min" in text
    assert "AMD EPYC, 2 CPU cores, JAX devices: 1 × Cpu" in text
    assert "✗ does NOT hold: claim 1 (evidence 1)" in text and "| 04_mri | §5.3, Fig. 6 | `laptop` |" in text
    # the commands, rebuilt from params.yaml: no --out, the -p overrides kept
    assert "`.venv/bin/diem-run 03_cifar10 --profile laptop -p cifar10 data/cifar10-jpeg.tar.gz`" in text
    assert "`.venv/bin/diem-run 04_mri --profile laptop -p laps 1`" in text
    assert "`.venv/bin/diem-run 02_tweedie_covariance --profile laptop`" in text


def test_fallback_profile_is_labelled(page):
    _, text = page
    section = text.split("## 01_manifold")[1].split("\n## ")[0]
    assert "profile `ci`" in section and "The page asked for `laptop`: none yet" in section
    assert "numbers are noise" in section
    assert "(file time)" in section and "Machine:** not recorded" in section  # no run record
    assert "`.venv/bin/diem-run 01_manifold --profile ci`" in section


def test_figures_are_copied_and_downscaled(page):
    path, text = page
    results = path.parent / "results"
    assert not (results / "02_tweedie_covariance" / "old.png").exists()
    for stem in METRICS:
        for name, (width, height) in FIGURES[stem].items():
            copy = results / stem / name
            if f"results/{stem}/{name})" not in text:  # an earlier lap's figure: not shown
                assert not copy.exists()
                continue
            with Image.open(copy) as image:
                assert image.width == min(width, 900)
                assert abs(image.height - height * image.width / width) <= 1
    assert "results/01_manifold/corner_lap01.png" in text  # the last lap's
    assert "results/04_mri/metrics.png" in text
    total = sum(p.stat().st_size for p in results.rglob("*.png"))
    assert f"Figures: {len(list(results.rglob('*.png')))} PNG files" in text and f"{total / 1024:.0f} kB" in text


def test_notebook_without_run(tmp_path, capsys):
    outputs, docs = tmp_path / "outputs", tmp_path / "docs"
    fake_run(outputs, "04_mri", "laptop")
    assert report.main(["--outputs", str(outputs), "--docs", str(docs), "--profile", "laptop"]) == 0
    assert "wrote" in capsys.readouterr().out
    text = (docs / "results.md").read_text()
    section = text.split("## 03_cifar10")[1].split("\n## ")[0]
    assert "**Not run yet.**" in section and ".venv/bin/diem-run 03_cifar10 --profile laptop" in section
    assert "fetches CIFAR-10" in section
    assert "| 01_manifold | §5.1, Fig. 3 | not run yet |" in text


def test_metrics_of_another_version_are_reported_not_raised(tmp_path):
    outputs = tmp_path / "outputs"
    out = fake_run(outputs, "03_cifar10", "laptop")
    (out / "metrics.json").write_text(json.dumps({"q0": {}, "laps": []}))
    text = report.write_report(ROOT, outputs, tmp_path / "docs").read_text()
    assert "metrics.json lacks what this page reads" in text


def test_profile_order(tmp_path):
    outputs = tmp_path / "outputs"
    for profile in ("ci", "paper"):
        fake_run(outputs, "04_mri", profile)
    assert report.find_run(outputs, "04_mri", "ci").name == "ci"
    assert report.find_run(outputs, "04_mri", "laptop").name == "paper"
    assert report.find_run(outputs, "01_manifold", "laptop") is None


def ablation_run(outputs, covariance, fids, extra=()):
    """Notebook 03's laptop run with `-p covariance COVARIANCE`, FID per lap `fids` (q0 first)."""
    plan = runner.resolve("03_cifar10", "laptop", [*COMMANDS["03_cifar10"], ("covariance", covariance), *extra],
                          out=outputs / "03_cifar10" / f"laptop-{covariance}", root=ROOT)
    plan.out_dir.mkdir(parents=True)
    (plan.out_dir / "params.yaml").write_text(runner._dump_params(plan))
    metrics = em({"fid": fids[0], "kid_mean": fids[0] / 1000},
                 [{"fid": fid, "kid_mean": fid / 1000} for fid in fids[1:]])
    (plan.out_dir / "metrics.json").write_text(json.dumps(metrics))
    return plan.out_dir


def section(text, stem):
    return text[text.index(f"## {stem}"):].split("\n## ")[0]


def test_table1_ablation_side_by_side(tmp_path):
    """Runs of notebook 03 that differ in `covariance` only are shown together (Table 1): a table
    per lap, one figure, each run's command, and the verdict on the paper's order."""
    outputs, docs = tmp_path / "outputs", tmp_path / "docs"
    fake_run(outputs, "03_cifar10", "laptop")  # tweedie: FID 358 -> 330 -> 265.4
    ablation_run(outputs, "sigma_over_1p", [358.0, 335.0, 300.0])
    ablation_run(outputs, "sigma", [358.0, 340.0, 330.0])
    ablation_run(outputs, "zero", [358.0, 200.0, 100.0], extra=[("laps", "2")])  # another scale: not shown
    page = report.write_report(ROOT, outputs, docs, "laptop").read_text()
    assert "| 03_cifar10 | §5.2, Table 1, Figs. 4-5 | `laptop` and 2 more with another `covariance` |" in page
    text = section(page, "03_cifar10")
    assert "### Table 1" in text and "3 runs whose parameters differ in `covariance` only" in text
    assert "`zero`" not in text
    assert ("--out outputs/03_cifar10/laptop-sigma_over_1p" in text
            and ".venv/bin/diem-run 03_cifar10 --profile laptop -p cifar10 data/cifar10-jpeg.tar.gz -p covariance sigma "
                "--out outputs/03_cifar10/laptop-sigma`" in text)
    assert "| lap 1 | 265.4 | 300 | 330 | 0.246 | 0.3 | 0.33 |" in text  # the run shown, then the oldest first
    assert "yes, the paper's order in FID and KID: (I + Σ_t⁻¹)⁻¹ FID +34.6 (1.13×)" in text, text
    assert "Σ_t FID +64.6 (1.24×)" in text
    figure = docs / "results" / "03_cifar10" / "ablation_covariance.png"
    assert figure.is_file() and "results/03_cifar10/ablation_covariance.png" in text


def test_table1_ablation_out_of_order(tmp_path):
    """Σ_t ahead of Tweedie's is reported as the order not holding."""
    outputs, docs = tmp_path / "outputs", tmp_path / "docs"
    fake_run(outputs, "03_cifar10", "laptop")  # tweedie: 265.4 at lap 1
    ablation_run(outputs, "sigma", [358.0, 320.0, 250.0])
    text = section(report.write_report(ROOT, outputs, docs, "laptop").read_text(), "03_cifar10")
    assert "after 2 laps, ρ = 0.5: Σ_t FID 250.0, KID 0.250; Tweedie's FID 265.4" in text
    assert "no: FID ranks them Σ_t < Tweedie's, KID Tweedie's < Σ_t (the paper: Tweedie's < Σ_t)" in text


def test_table1_ablation_with_a_run_that_stopped(tmp_path):
    """A run whose EM stopped (no metrics.json; the laps its driver finished in run/metrics.json,
    the error in its executed notebook) is shown with its laps and the error, and ranks last."""
    outputs, docs = tmp_path / "outputs", tmp_path / "docs"
    fake_run(outputs, "03_cifar10", "laptop")
    ablation_run(outputs, "sigma", [358.0, 340.0, 330.0])
    out = ablation_run(outputs, "sigma_over_1p", [358.0, 500.0])
    (out / "run").mkdir()
    (out / "metrics.json").rename(out / "run" / "metrics.json")
    error = {"output_type": "error", "ename": "FloatingPointError", "evalue": "lap 1: non-finite loss at step 5",
             "traceback": []}
    (out / "03_cifar10.ipynb").write_text(json.dumps({"cells": [{"cell_type": "code", "outputs": [error]}]}))
    text = section(report.write_report(ROOT, outputs, docs, "laptop").read_text(), "03_cifar10")
    assert "(I + Σ_t⁻¹)⁻¹ stopped after 1 lap (FloatingPointError: lap 1: non-finite loss at step 5)" in text
    assert "**stopped after 1 lap**: FloatingPointError" in text
    assert ("partly: Tweedie's is best in FID and KID (Σ_t FID +64.6 (1.24×), KID +0.084), but the heuristics rank "
            "Σ_t < (I + Σ_t⁻¹)⁻¹ in FID (the paper: (I + Σ_t⁻¹)⁻¹ < Σ_t)" in text)
    assert "| lap 1 | 265.4 | 330 | – |" in text  # tweedie, sigma (oldest first after the run shown), stopped


def test_no_ablation_without_other_runs(page):
    _, text = page
    text = section(text, "03_cifar10")
    assert "### Table 1" not in text and "not run: the ablation is one run per covariance" in text
