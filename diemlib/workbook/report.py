r"""The results page `docs/results.md`, generated from the runs under `outputs/`: `make report`.

```
python -m diemlib.workbook.report [--profile laptop] [--outputs DIR] [--docs DIR] [--max-width 900]
```

For every notebook the page takes one run, `outputs/<notebook>/<run>/` with a `metrics.json`:
the `--profile` asked for, else the first that exists of `paper`, `laptop`, `default`,
`interactive` (JupyterLab) and `ci`, else the newest other one; the section says which, and what
numbers at that scale mean. It sets the paper's claims beside this run's numbers (the paper's
numbers are copied into `PAPER` below, each with the table it comes from) and says where our
scale cannot show a claim; lists the claims the notebook checked on its own numbers (`claims`
in `metrics.json`, see [`Claims`][diemlib.workbook.claims.Claims]); gives the scale the run used
against the paper's (`params/<notebook>/paper.yaml`), when and on which machine it ran and its
wall time (`run` in `metrics.json`, written by `diem-run`), and the command that runs it again
(rebuilt from the `# from:` line of its `params.yaml` by `runner.command_line`). A notebook
without a run gets a section saying so, with the command that makes one. The figures shown are
copied into `docs/results/<notebook>/`, downscaled to `--max-width` pixels.

An ablation is a set of runs of one notebook whose parameters differ in one parameter only: for
notebook 03, `covariance` (Table 1, `make table1`). The page shows them beside the run it takes,
their metrics per lap in one table and one figure, and says whether they come in the paper's order.

The page is generated: it says so at its top, and every `make report` rewrites it whole.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from .params import RunnerError
from .runner import PROFILE_NOTES, command_line, find_root, list_notebooks, read_params_file

__all__ = ["PAPER", "Run", "find_run", "main", "write_report"]

FALLBACK = ("paper", "laptop", "default", "interactive", "ci")
VENV_BIN = ".venv/bin/"
CIFAR_NOTE = ("it fetches CIFAR-10, 170 MB, into `data/` on first use; offline, run `make data` on "
              "a machine with a network first, or add `-p cifar10 PATH` to an archive or image folder")

# The paper's numbers (Rozet, Andry, Lanusse & Louppe, NeurIPS 2024), with where they come from.
PAPER = {
    # Table 1: CIFAR-10 after 32 laps of DiEM (Tweedie's covariance), 50 000 samples, by rho.
    "cifar10_fid": {0.25: 5.88, 0.5: 6.76, 0.75: 13.18},
    "cifar10_is": {0.25: 8.83, 0.5: 8.75, 0.75: 8.14},
    # Table 1, rho = 75 %: the same with a heuristic covariance in MMPS (Fig. 5's samples).
    "cifar10_fid_heuristic": {"sigma_over_1p": 39.94, "sigma": 118.69},
    # Table 4 (App. E), FFHQ 256: MMPS at 10 steps with 5 solver iterations: PSNR, SSIM, LPIPS.
    "mmps_table4": {"box": (21.73, 0.69, 0.23), "random": (23.72, 0.75, 0.20),
                    "motion": (26.70, 0.78, 0.20), "sr": (28.02, 0.81, 0.18)},
    # App. E, cost table: network forward passes F and VJPs B per step (k: MMPS's iterations).
    "cost_per_step": {"DPS": "1F + 1B", "ΠGDM": "1F + 1B", "TMPD": "1F + 2B", "DiffPIR": "1F",
                      "MMPS (k)": "1F + (k + 1)B"},
}


# --------------------------------------------------------------------------- runs


@dataclass
class Run:
    """One run directory `outputs/<stem>/<name>/`: its `metrics.json` and `params.yaml`."""

    stem: str
    name: str
    path: Path
    metrics: dict
    params: dict = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)  # the `# from:` line of params.yaml
    ablation: dict[str, Run] = field(default_factory=dict)  # value -> run, see `ablation_runs`
    stopped: str = ""  # why an EM run stopped before its last lap (its notebook's error), else ""

    @classmethod
    def read(cls, stem: str, path: Path) -> Run:
        """The run in `path`; an EM run that stopped before its end (no `metrics.json`) is read from
        the laps its driver finished (`run/metrics.json`), with the error its notebook raised."""
        if (path / "metrics.json").is_file():
            metrics, stopped = json.loads((path / "metrics.json").read_text()), ""
        else:
            metrics, stopped = json.loads((path / "run" / "metrics.json").read_text()), _error(path / f"{stem}.ipynb")
        params_path, params, sources = path / "params.yaml", {}, []
        if params_path.is_file():
            params = read_params_file(params_path)
            header = re.search(r"^# from: (.+)$", params_path.read_text(), re.M)
            sources = header.group(1).split(" <- ") if header else []
        return cls(stem, path.name, path, metrics, params or metrics.get("params", {}), sources, stopped=stopped)

    @property
    def command(self) -> str | None:
        """The command that runs it again into this directory (None: not run by `diem-run`):
        `--profile P --out outputs/<stem>/<name>` where the directory is not named after P."""
        if not self.sources:
            return None
        files = [s for s in self.sources[1:] if not s.startswith("-p ")]
        profile = Path(files[0]).stem if files else "default"
        if (files and files[0] != f"params/{self.stem}/{profile}.yaml") or profile == self.name:
            return VENV_BIN + command_line(self.stem, self.sources, self.name)
        return VENV_BIN + command_line(self.stem, self.sources, profile, Path("outputs", self.stem, self.name))

    @property
    def record(self) -> dict:
        """`run` in `metrics.json`: `command`, `finished`, `wall_time_s`, `machine`."""
        return self.metrics.get("run", {})

    @property
    def wall_time(self) -> str | None:
        """Its wall time as text, e.g. "14 min 27 s" (None: not recorded)."""
        seconds = self.record.get("wall_time_s")
        return None if seconds is None else _duration(seconds)

    @property
    def finished(self) -> str:
        if "finished" in self.record:
            return self.record["finished"]
        mtime = max(p.stat().st_mtime for p in self.path.glob("**/metrics.json"))
        return datetime.fromtimestamp(mtime).astimezone().isoformat(timespec="seconds") + " (file time)"

    def stale(self) -> bool:
        """Whether `params.yaml` is newer than `metrics.json`: a later run started here and has not
        finished (or failed), so the numbers are an earlier run's."""
        params, metrics = self.path / "params.yaml", self.path / "metrics.json"
        return params.is_file() and params.stat().st_mtime > metrics.stat().st_mtime + 1


def find_run(outputs: Path, stem: str, profile: str) -> Run | None:
    """The run shown for `stem`: `profile`, else the first of `FALLBACK`, else the newest other."""
    base = Path(outputs) / stem
    runs = [d for d in base.iterdir() if (d / "metrics.json").is_file()] if base.is_dir() else []
    if not runs:
        return None
    order = [profile, *FALLBACK]
    best = min(runs, key=lambda d: (order.index(d.name) if d.name in order else len(order),
                                    -(d / "metrics.json").stat().st_mtime))
    return Run.read(stem, best)


def _error(notebook: Path) -> str:
    """The error a notebook executed by papermill stopped on ("" if none is recorded)."""
    if not notebook.is_file():
        return ""
    outputs = (o for cell in json.loads(notebook.read_text()).get("cells", []) for o in cell.get("outputs", []))
    error = next((o for o in outputs if o.get("output_type") == "error"), None)
    return f"{error['ename']}: {error['evalue']}" if error else ""


def ablation_runs(outputs: Path, run: Run, parameter: str) -> dict[str, Run]:
    """The runs of `run`'s notebook whose parameters equal its own but for `parameter` (an
    ablation, as notebook 03's `covariance` for Table 1), `run` included, by that parameter's
    value (the newest run of each value); empty where there is no other value. An EM run that
    stopped before its last lap is one of them, with the laps it finished (`Run.stopped`)."""
    ignored = {parameter, "out_dir", "overwrite"}
    same = lambda params: {k: v for k, v in params.items() if k not in ignored}
    base = Path(outputs) / run.stem
    candidates = [(p, p.parent) for p in base.glob("*/metrics.json")] + [
        (p, p.parent.parent) for p in base.glob("*/run/metrics.json") if not (p.parent.parent / "metrics.json").is_file()]
    own, others = str(run.params.get(parameter)), {}
    for path, directory in sorted(candidates, key=lambda c: c[0].stat().st_mtime):
        if directory != run.path:
            other = Run.read(run.stem, directory)
            value = str(other.params.get(parameter))
            if value != own and same(other.params) == same(run.params) and "laps" in other.metrics:
                others[value] = other
    return {own: run, **others} if others else {}


# --------------------------------------------------------------------------- formatting


def _num(x, spec: str = ".3g") -> str:
    """A number from metrics.json (where non-finite ones are strings)."""
    if x is None:
        return "–"
    return x if isinstance(x, str) else format(x, spec)


def _duration(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    h, m = divmod(minutes, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s" if m else f"{s} s"


def _laps(n: int) -> str:
    return f"{n} lap" + ("s" if n != 1 else "")


def _table(head: list[str], rows: list[list]) -> list[str]:
    """A Markdown table (a `|` inside a cell, as in q(x_t | y), is escaped)."""
    cells = lambda row: "| " + " | ".join(str(c).replace("|", r"\|") for c in row) + " |"
    return [cells(head), "|" + "---|" * len(head), *map(cells, rows), ""]


def _machine(record: dict) -> str:
    m = record.get("machine")
    if not m:
        return "not recorded (a run from before `diem-run` recorded it)"
    kinds = Counter(re.findall(r"(\w+)Device\(", m.get("jax_devices") or ""))
    devices = ", ".join(f"{n} × {kind}" for kind, n in kinds.items()) or "not printed by the notebook"
    return f"{m.get('processor')}, {m.get('cpus')} CPU cores, JAX devices: {devices} ({m.get('platform')})"


def _lap_table(metrics: dict, columns: dict[str, tuple[str, str]]) -> list[str]:
    """q0 and every lap of an EM run; `columns` maps a key of a lap's metrics to (heading, format)."""
    row = lambda label, m: [label, *(_num(m.get(key), spec) for key, (_, spec) in columns.items())]
    rows = [row("q0", metrics["q0"])]
    rows += [row(f"lap {m['lap']}" + (" (diverged)" if m.get("diverged") else ""), m) for m in metrics["laps"]]
    return _table(["", *(head for head, _ in columns.values())], rows)


def _change(metrics: dict, key: str, spec: str, unit: str = "") -> str:
    last = metrics["laps"][-1]
    return f"{_num(metrics['q0'][key], spec)}{unit} (q0) → {_num(last[key], spec)}{unit} (lap {last['lap']})"


def _improved(metrics: dict, key: str, lower_is_better: bool = True) -> str:
    """Whether the last lap beats q0 on `key`: what a run smaller than the paper's can show."""
    q0, last = metrics["q0"][key], metrics["laps"][-1][key]
    if isinstance(q0, str) or isinstance(last, str):
        return f"no: {key} is not finite"
    better = last < q0 if lower_is_better else last > q0
    return f"the direction: {key} better than q0's" if better else f"no: {key} no better than q0's"


# --------------------------------------------------------------------------- sections
# Each notebook's section: the paper's claims beside this run's numbers (rows of claim, paper,
# this run, and whether our scale shows it), then its own tables.


def _manifold(run: Run):
    m, p = run.metrics, run.params
    compare = [[
        "The prior learned from 2-D projections alone converges to the 1-D manifold in R^5 "
        "(Fig. 3: corner plots at laps 0-31)",
        "corner plots, no number; 32 laps on 65 536 observations",
        f"Sinkhorn number to the ground truth {_change(m, 'sinkhorn', '.3g')}; evidence check "
        f"{_change(m, 'evidence', '.3g')}",
        f"{_improved(m, 'sinkhorn')}, {_laps(len(m['laps']))} on {p.get('observations', '?')} observations"
        + "".join(f"; {k}: {v}" for k, v in m.get("unresolved", {}).items()),
    ]]
    details = _lap_table(m, {"sinkhorn": ("Sinkhorn to the truth", ".4g"), "evidence": ("evidence check", ".4g"),
                             "loss": ("training loss", ".3g"), "estep_time": ("E-step s", ".0f"),
                             "mstep_time": ("M-step s", ".0f")})
    return compare, details


def _tweedie(run: Run):
    m, p = run.metrics, run.params
    rows = m["verdict"]
    resolved = [r for r in rows if not r["heuristic_at_floor"]]
    better, tenfold = sum(r["ratio"] > 1 for r in resolved), sum(r["ratio"] >= 10 for r in resolved)
    helix = m["fig1_helix"]
    scores = {k: v for k, v in helix["divergence"].items() if k != "exact" and not isinstance(v, str)}
    shown = "yes" if tenfold == len(resolved) > 0 else "partly" if tenfold else "no"
    compare = [[
        "Tweedie's covariance makes q(x_t | y) orders of magnitude closer to p(x_t | y) than the "
        "heuristics 0, Σ_t, (I + Σ_t⁻¹)⁻¹ and the prior's (Fig. 2)",
        "orders of magnitude; medians of 64 experiments",
        f"Tweedie better than the best heuristic at {better} of {len(resolved)} resolved σ_t, by ≥ 10× at "
        f"{tenfold} ({len(rows) - len(resolved)} of {len(rows)} σ_t unresolved: the heuristics at the "
        "estimator's floor)",
        f"{shown}: medians of {p.get('seeds', '?')} experiments, heuristics "
        f"{', '.join(c for c in m['choices'] if c != 'tweedie')}, Sinkhorn numbers on "
        f"{p.get('divergence_samples', '?')} samples",
    ], [
        "Fig. 1: on a helix, only Tweedie's q(x_t | y) matches the true posterior",
        "scatter plots, no number",
        "Sinkhorn number to the true posterior: " + ", ".join(
            f"{'floor (exact)' if k == 'exact' else k} {_num(v, '.2g')}" for k, v in helix["divergence"].items()),
        f"{'yes' if min(scores, key=scores.get, default=None) == 'tweedie' else 'no'}: the same figure, "
        f"at σ_t = {helix['sigma']}",
    ]]
    details = _table(["σ_t", "best heuristic", "its median / Tweedie's", "verdict"],
                     [[_num(r["sigma"], "g"), r["best_heuristic"], _num(r["ratio"], ".3g"), r["verdict"]]
                      for r in rows])
    return compare, details


def _cifar10(run: Run):
    m, p = run.metrics, run.params
    rho, covariance, last = p.get("rho"), p.get("covariance", "tweedie"), m["laps"][-1]
    counts = (f"{last.get('n_samples', p.get('eval_samples', '?'))} samples against "
              f"{last.get('n_reference', p.get('fid_reference', '?'))} clean images")
    if covariance == "tweedie":
        fid = PAPER["cifar10_fid"].get(rho)
    else:  # Table 1 has the heuristics at rho = 75 % only
        fid = PAPER["cifar10_fid_heuristic"].get(covariance) if rho == 0.75 else None
    compare = [[
        f"FID of the prior learned from CIFAR-10 with ρ = {_num(rho, 'g')} of the pixels deleted, MMPS with "
        f"the `{covariance}` covariance (Table 1)",
        f"{fid} after 32 laps, 50 000 samples" if fid
        else "not in Table 1 (ρ = 0.25, 0.5, 0.75; the heuristics at 0.75)",
        f"{_change(m, 'fid', '.1f')}; KID {_change(m, 'kid_mean', '.3f')}",
        f"{_improved(m, 'fid')}; its value is not comparable: {_laps(len(m['laps']))}, {counts} (FID is "
        f"biased upwards at small counts), data `{p.get('cifar10', '?')}`, Inception weights: {m['q0'].get('weights', '?')}",
    ], [
        "Inception Score (Table 1)",
        str(PAPER["cifar10_is"].get(rho, "–")),
        _num(last["isc_mean"], ".2f") if "isc_mean" in last else "not computed",
        "only with torch-fidelity's official Inception weights (`-p inception_weights PATH`)",
    ], [
        "A heuristic covariance instead of Tweedie's degrades the prior (Table 1, Fig. 5)",
        "FID 39.94 with (I + Σ_t⁻¹)⁻¹ and 118.69 with Σ_t, against 13.18, at ρ = 0.75",
        *_covariance_ablation(run),
    ]]
    details = _lap_table(m, {"fid": ("FID", ".1f"), "kid_mean": ("KID", ".4f"), "loss": ("training loss", ".3g"),
                             "estep_time": ("E-step s", ".0f"), "mstep_time": ("M-step s", ".0f"),
                             "eval_time": ("evaluation s", ".0f")})
    return compare, details


COVARIANCES = {"tweedie": "Tweedie's", "sigma_over_1p": "(I + Σ_t⁻¹)⁻¹", "sigma": "Σ_t"}  # Table 1's order


def _covariance_ablation(run: Run) -> list[str]:
    """Table 1's claim on the runs that differ in `covariance` only: each one's FID and KID at the
    last lap, and whether they come in the paper's order (Tweedie's best, Σ_t worst). A run that
    stopped before the last lap, or whose numbers are not finite, ranks behind every other."""
    if not run.ablation:
        return [f"this run uses `{run.params.get('covariance', 'tweedie')}` only",
                "not run: the ablation is one run per covariance, same parameters otherwise (`make table1`; or "
                "`-p covariance sigma_over_1p`, `-p covariance sigma`, each with its own `--out outputs/03_cifar10/NAME`)"]
    runs, label = run.ablation, lambda c: COVARIANCES.get(c, f"`{c}`")
    laps = max(len(r.metrics["laps"]) for r in runs.values())
    last = {c: r.metrics["laps"][-1] for c, r in runs.items() if len(r.metrics["laps"]) == laps and not r.stopped}
    finite = {c: m for c, m in last.items() if not isinstance(m["fid"], str) and not isinstance(m["kid_mean"], str)}
    behind = sorted((c for c in runs if c not in finite), key=lambda c: -len(runs[c].metrics["laps"]))
    fid_order, kid_order = (sorted(finite, key=lambda c: finite[c][key]) + behind for key in ("fid", "kid_mean"))
    paper = [c for c in COVARIANCES if c in runs] + [c for c in runs if c not in COVARIANCES]
    why = lambda c: (f"stopped after {_laps(len(runs[c].metrics['laps']))} ({runs[c].stopped or 'unfinished'})"
                     if c not in last else "numbers not finite")
    ours = "; ".join([f"{label(c)} FID {finite[c]['fid']:.1f}, KID {finite[c]['kid_mean']:.3f}" for c in fid_order
                      if c in finite] + [f"{label(c)} {why(c)}" for c in behind])
    base = finite.get("tweedie")
    gaps = ", ".join(f"{label(c)} FID +{finite[c]['fid'] - base['fid']:.1f} ({finite[c]['fid'] / base['fid']:.2f}×), "
                     f"KID +{finite[c]['kid_mean'] - base['kid_mean']:.3f}" for c in fid_order if c in finite and c != "tweedie"
                     ) if base else ""
    said = lambda order: " < ".join(label(c) for c in order)
    if fid_order == kid_order == paper:
        verdict = "yes, the paper's order in FID and KID" + (f": {gaps} over Tweedie's" if gaps else "")
    elif fid_order[0] == kid_order[0] == "tweedie":
        verdict = (f"partly: Tweedie's is best in FID and KID ({gaps or 'the others stopped'}), but the heuristics "
                   f"rank {said(fid_order[1:])} in FID (the paper: {said(paper[1:])})")
    else:
        verdict = f"no: FID ranks them {said(fid_order)}, KID {said(kid_order)} (the paper: {said(paper)})"
    return [f"after {_laps(laps)}, ρ = {_num(run.params.get('rho'), 'g')}: {ours}",
            f"{verdict}; same seed, data and laps, at this run's scale (see Table 1 below)"]


def _mri(run: Run):
    m, p = run.metrics, run.params
    study = m["study"]
    methods = ("zero-filled", "posterior mean", "posterior sample")
    worse = [R for R, s in study.items() if not s["posterior mean psnr"] > s["zero-filled psnr"]]
    compare = [[
        "A prior learned by DiEM from under-sampled k-space alone (R = 6) reconstructs held-out scans",
        "Fig. 6: fastMRI knees, 320 × 320, 16 laps; no PSNR given",
        f"held-out posterior PSNR {_change(m, 'psnr', '.2f', ' dB')}",
        f"{_improved(m, 'psnr', lower_is_better=False)}: {m.get('summary', {}).get('data', '?')}, "
        f"{p.get('size', '?')} × {p.get('size', '?')} slices, {_laps(len(m['laps']))}",
    ], [
        "Posterior samples at R = 4, 8, 16, 32 are plausible and consistent with the measured columns; "
        "the prior fills in more as R grows (Fig. 6)",
        "samples shown, no number",
        "posterior mean vs zero-filled PSNR: " + ", ".join(
            f"R = {R}: {_num(s['posterior mean psnr'], '.1f')} vs {_num(s['zero-filled psnr'], '.1f')} dB"
            for R, s in study.items()),
        ("yes: the posterior mean beats the zero-filled image at every R" if not worse else
         f"no: the posterior mean is no better than the zero-filled image at R = {', '.join(worse)}")
        + "; the posterior std is shown too (not in the paper)",
    ]]
    details = _lap_table(m, {"psnr": ("held-out PSNR (dB)", ".2f"), "ssim": ("SSIM", ".3f"),
                             "evidence": ("evidence check", ".4g"), "loss": ("training loss", ".3g")})
    details += _table(["R", *(f"{x} PSNR / SSIM" for x in methods)],
                      [[R, *(f"{_num(s[f'{x} psnr'], '.2f')} / {_num(s[f'{x} ssim'], '.3f')}" for x in methods)]
                       for R, s in study.items()])
    return compare, details


def _triple(values) -> str:
    """PSNR/SSIM/LPIPS as Table 4 prints them."""
    return "/".join(f"{v:.2f}" for v in values)


def _mmps(run: Run):
    m, p = run.metrics, run.params
    results, summary = m["results"], m.get("summary", {})
    k = max(p.get("mmps_iterations", [5]))
    ours_at_10, gains = [], []
    for task, by_steps in results.items():
        for T, row in by_steps.items():
            ours = row.get(f"MMPS ({k})")
            if T == "10" and ours and task in PAPER["mmps_table4"]:
                ours_at_10.append(f"{task} {_triple((ours['psnr'], ours['ssim'], ours['lpips']))}")
            if k > 1 and "MMPS (1)" in row and ours:
                gains.append((ours["psnr"] - row["MMPS (1)"]["psnr"], task, T))
    ahead = {q: sum(s[f"{q}_gain"] > 0 for s in summary.values()) for q in ("psnr", "ssim")}
    gain, gain_task, gain_steps = max(gains) if gains else (None, None, None)
    task, by_steps = next(iter(results.items()))
    T, row = next(iter(by_steps.items()))
    counted = ", ".join(f"{name} {r['forward_per_step']:.2f}F + {r['vjp_per_step']:.2f}B" for name, r in row.items())
    scale = (f"CIFAR-10 32 × 32 (paper: FFHQ 256 × 256), our own prior ({p.get('train_steps', '?')} Adam "
             f"steps), {p.get('test_images', '?')} images per task, steps {p.get('steps', '?')}")
    compare = [[
        "MMPS at 10 steps, 5 solver iterations: PSNR/SSIM/LPIPS per task (Table 4)",
        "; ".join(f"{t} {_triple(v)}" for t, v in PAPER["mmps_table4"].items()),
        "; ".join(ours_at_10) or f"no MMPS ({k}) run at 10 steps",
        f"not comparable: {scale}; LPIPS at 32 × 32 leaves three AlexNet layers 1 × 1",
    ], [
        "MMPS beats every baseline on PSNR and SSIM at equal steps (Table 4)",
        "every task, 10 to 1000 steps",
        f"MMPS ({k}) ahead of the best baseline in PSNR at {ahead['psnr']} and in SSIM at {ahead['ssim']} "
        f"of {len(summary)} (task, steps)",
        ("yes" if ahead["psnr"] == ahead["ssim"] == len(summary) else "not everywhere") + f", at {scale}",
    ], [
        "1 → 5 solver iterations help most on motion deblurring (Table 4)",
        "motion deblurring",
        f"largest PSNR gain from MMPS (1) to MMPS ({k}): {gain_task} at {gain_steps} steps ({gain:+.2f} dB)"
        if gains else f"not measured: MMPS with {p.get('mmps_iterations', '?')} iterations only",
        "yes" if gain_task == "motion" else "no",
    ], [
        "Cost per step (App. E, cost table)",
        ", ".join(f"{name} {cost}" for name, cost in PAPER["cost_per_step"].items()),
        f"counted while the compiled program ran ({task}, {T} steps): {counted}",
        "yes: network passes are counted; time and memory are this machine's",
    ]]
    details = []
    for task, by_steps in results.items():
        for T, row in by_steps.items():
            details += [f"**{task}, {T} steps**", ""]
            details += _table(
                ["method", "PSNR (dB)", "SSIM", "LPIPS", "F / step", "B / step", "s / image", "peak MiB"],
                [[name, f"{r['psnr']:.2f} ± {r.get('psnr_sem', 0):.2f}", f"{r['ssim']:.3f}",
                  _num(r.get("lpips"), ".3f"), f"{r['forward_per_step']:.2f}", f"{r['vjp_per_step']:.2f}",
                  _num(r.get("seconds_per_image"), ".3g"), _num(r.get("peak_mib"), ".0f")] for name, r in row.items()])
    return compare, details


@dataclass(frozen=True)
class Section:
    """What the page shows of one notebook."""

    title: str
    paper: str  # where in the paper
    render: Callable[[Run], tuple[list[list], list[str]]]  # (rows beside the paper, tables)
    scale: tuple[str, ...]  # parameters shown against the paper profile's
    figures: tuple[tuple[str, str], ...]  # (file name, or a glob whose last match is shown; caption)
    needs: str = ""  # what a first run needs beyond the command
    ablation: str = ""  # a parameter whose other values, run with the rest unchanged, are shown side by side
    ablation_metrics: tuple[tuple[str, str], ...] = ()  # (key of a lap's metrics, heading) shown per value
    ablation_title: str = ""


SECTIONS = {
    "01_manifold": Section(
        "DiEM on a low-dimensional manifold", "§5.1, Fig. 3", _manifold,
        ("observations", "laps", "mstep_steps", "estep_steps", "solver", "eval_samples"),
        (("corner_q0.png", "the Gaussian q0: prior samples (below the diagonal) against the ground truth (above)"),
         ("corner_lap*.png", "the last lap's prior (Fig. 3)"),
         ("metrics.png", "Sinkhorn number, evidence check, loss and time per lap"))),
    "02_tweedie_covariance": Section(
        "Tweedie's covariance against heuristics", "§4.2, Figs. 1-2", _tweedie,
        ("seeds", "prior_samples", "divergence_samples", "helix_samples"),
        (("fig1_helix.png", "Fig. 1: each covariance's q(x_t | y) against the true posterior on a helix"),
         ("fig2_divergence.png", "Fig. 2: Sinkhorn number to the true p(x_t | y) against σ_t, median and 25-75 %"))),
    "03_cifar10": Section(
        "DiEM on corrupted CIFAR-10", "§5.2, Table 1, Figs. 4-5", _cifar10,
        ("observations", "rho", "covariance", "laps", "widths", "mstep_epochs", "eval_samples", "fid_reference",
         "cifar10"),
        (("corruption.png", "the observations: pixels deleted at random"),
         ("samples_q0.png", "q0: observations and unconditional samples"),
         ("samples_lap*.png", "the last lap: observations, posterior samples and prior samples (Fig. 4)"),
         ("metrics.png", "FID, KID, loss and time per lap")),
        CIFAR_NOTE, "covariance", (("fid", "FID"), ("kid_mean", "KID"), ("loss", "training loss")),
        "Table 1: the covariance in MMPS, Tweedie's against the heuristics (lower is better)"),
    "04_mri": Section(
        "DiEM for accelerated MRI", "§5.3, Fig. 6", _mri,
        ("size", "observations", "laps", "widths", "mstep_epochs", "estep_steps", "study_steps", "brain_volume",
         "fastmri"),
        (("observations.png", "the training observations: under-sampled k-space, zero-filled"),
         ("samples_lap*.png", "the last lap's prior samples"),
         ("reconstructions_0.png", "Fig. 6: a held-out slice at R = 4-32: zero-filled, two posterior samples, "
                                   "posterior std, truth"),
         ("quality_vs_R.png", "PSNR and SSIM against R"),
         ("metrics.png", "held-out PSNR and SSIM, evidence check, loss and time per lap"))),
    "05_mmps_evaluation": Section(
        "MMPS against DPS, ΠGDM, TMPD and DiffPIR", "App. E, Table 4 and its cost table", _mmps,
        ("train_images", "train_steps", "widths", "test_images", "steps", "mmps_iterations", "cifar10"),
        (("observations.png", "the four tasks' observations"),
         ("samples_box.png", "box inpainting: one posterior sample per method"),
         ("samples_random.png", "random inpainting"),
         ("samples_motion.png", "motion deblurring"),
         ("samples_sr.png", "4× super-resolution"),
         ("quality_vs_cost.png", "PSNR against time per image and network passes per step")),
        CIFAR_NOTE),
}


# --------------------------------------------------------------------------- the page


def _shown(path: Path, root: Path) -> str:
    """`path`, relative to the repository root where it is inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def _scale(run: Run, section: Section, root: Path) -> str:
    paper_file = root / "params" / run.stem / "paper.yaml"
    paper = read_params_file(paper_file) if paper_file.is_file() else {}
    shown = []
    for name in section.scale:
        ours, theirs = run.params.get(name), paper.get(name)
        if ours not in ("", None):
            shown.append(f"`{name}` {json.dumps(ours, ensure_ascii=False)}" + (
                "" if theirs in (None, ours) else f" (paper {json.dumps(theirs, ensure_ascii=False)})"))
    return ", ".join(shown) or "parameters not recorded"


def _figures(run: Run, section: Section, dest: Path, max_width: int) -> list[str]:
    """Copies the section's figures into `dest`, downscaled to `max_width` and to 256 colours (a
    third of the bytes; matplotlib figures have few colours); their Markdown."""
    from PIL import Image

    dest.mkdir(parents=True, exist_ok=True)
    lines = []
    for pattern, caption in section.figures:
        matches = sorted(run.path.glob(pattern))
        if not matches:
            lines += [f"*{caption}: `{pattern}` not written by this run.*", ""]
            continue
        source = matches[-1]
        with Image.open(source) as image:
            if image.width > max_width:
                image = image.resize((max_width, round(image.height * max_width / image.width)), Image.LANCZOS)
            image = image.convert("RGB").quantize(256, Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
            image.save(dest / source.name, optimize=True)
        lines += [f"![{caption}](results/{run.stem}/{source.name})", f"*{source.name}: {caption}.*", ""]
    return lines


def _section(stem: str, run: Run | None, root: Path, outputs: Path, docs: Path, profile: str,
             max_width: int) -> list[str]:
    section = SECTIONS.get(stem)
    lines = [f"## {stem}" + (f": {section.title} ({section.paper})" if section else ""), ""]
    if run is None:
        needs = f" ({section.needs})" if section and section.needs else ""
        return lines + [f"**Not run yet.** No `{_shown(outputs / stem, root)}/*/metrics.json`. To make one{needs}:",
                        "", f"    {VENV_BIN}diem-run {stem} --profile {profile}", "", "then `make report` again.", ""]
    record, resumable = run.record, "laps" in run.metrics
    note = run.metrics.get("profile_note") or PROFILE_NOTES.get(run.name, "no profile note")
    wall = run.wall_time or "not recorded"
    lines += [
        f"- **Run:** `{_shown(run.path, root)}/`, profile `{run.name}`: {note}."
        + (f" (The page asked for `{profile}`: none yet.)" if run.name != profile else ""),
        f"- **Scale:** {_scale(run, section, root) if section else 'see its params.yaml'}.",
        f"- **Finished:** {run.finished}; **wall time:** {wall}"
        + (" (its last invocation, if it was resumed)" if resumable and run.wall_time else "") + ".",
        f"- **Machine:** {_machine(record)}.",
        f"- **Run it again:** `{run.command}`" if run.command
        else "- **Run it again:** not recorded (no `params.yaml`: a run in JupyterLab).",
        "",
    ]
    if run.name == "ci":
        lines += ["> **A `ci` run: a smoke test whose numbers are noise, not results.**", ""]
    if run.stale():
        lines += ["> `params.yaml` is newer than `metrics.json`: a later run of this directory has not "
                  "finished; the numbers below are the earlier run's.", ""]
    if section:
        try:
            compare, details = section.render(run)
        except (KeyError, TypeError, IndexError, StopIteration) as error:
            return lines + [f"**metrics.json lacks what this page reads** ({type(error).__name__}: {error}): "
                            "a run of an older version of the notebook? Run it again with the command above.", ""]
        lines += ["### The paper and this run", "",
                  *_table(["claim", "paper", "this run", "shown at this scale?"], compare)]
    lines += ["### Claims the notebook checked on this run's numbers", ""]
    if claims := run.metrics.get("claims"):
        lines += [f"{sum(c['holds'] for c in claims.values())} of {len(claims)} hold:", ""]
        lines += [f"- {'✓' if c['holds'] else '✗ does NOT hold:'} {claim} ({c['evidence']})"
                  for claim, c in claims.items()] + [""]
    else:
        lines += ["This notebook records no `claims`; its verdicts are in the tables below.", ""]
    if section:
        lines += ["### Numbers", "", *details]
        if run.ablation:
            lines += _ablation(run, section, root, docs / "results" / stem)
        lines += ["### Figures", "", *_figures(run, section, docs / "results" / stem, max_width)]
    return lines


def _ablation(run: Run, section: Section, root: Path, dest: Path) -> list[str]:
    """The runs that differ from `run` in `section.ablation` only: each metric per lap and value in
    one table, and in one figure (drawn here, into `dest`), with each run's command."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, name = run.ablation, section.ablation
    laps = max(len(r.metrics["laps"]) for r in runs.values())
    labels = ["q0", *(f"lap {i}" for i in range(laps))]
    per_lap = lambda r, key: [r.metrics["q0"].get(key)] + [m.get(key) for m in r.metrics["laps"]]
    head = [""] + [f"{heading}, `{value}`" for key, heading in section.ablation_metrics for value in runs]
    columns = [per_lap(r, key) for key, _ in section.ablation_metrics for r in runs.values()]
    rows = [[label, *(_num(c[i], ".4g") if i < len(c) else "–" for c in columns)] for i, label in enumerate(labels)]
    fig, axes = plt.subplots(1, len(section.ablation_metrics), figsize=(4.5 * len(section.ablation_metrics), 3.2),
                             squeeze=False)
    for ax, (key, heading) in zip(axes[0], section.ablation_metrics):
        for value, r in runs.items():
            values = [v if isinstance(v, (int, float)) else float("nan") for v in per_lap(r, key)]
            ax.plot(range(len(values)), values, "o-", label=f"{name} = {value}")
        shown = [v for line in ax.get_lines() for v in line.get_ydata() if v > 0]
        if shown and max(shown) > 100 * min(shown):  # e.g. a loss that blew up
            ax.set_yscale("log")
        ax.set_xticks(range(len(labels)), labels)
        ax.set_title(f"{heading} per lap")
    axes[0][0].legend()
    fig.tight_layout()
    dest.mkdir(parents=True, exist_ok=True)
    figure = dest / f"ablation_{name}.png"
    fig.savefig(figure, dpi=100)
    plt.close(fig)
    return [f"### {section.ablation_title or f'Ablation: `{name}`'}", "",
            f"{len(runs)} runs whose parameters differ in `{name}` only:", "",
            *(f"- `{name}` = `{value}`: `{_shown(r.path, root)}/`, {r.finished[:16]}, "
              + (f"**stopped after {_laps(len(r.metrics['laps']))}**: {r.stopped}; " if r.stopped else
                 f"{r.wall_time or 'wall time not recorded'}; ")
              + f"`{r.command}`" for value, r in runs.items()), "",
            *_table(head, rows),
            f"![{name} ablation](results/{run.stem}/{figure.name})",
            f"*{figure.name}: {', '.join(h for _, h in section.ablation_metrics)} per lap, one line per "
            f"`{name}`.*", ""]


def _summary_row(stem: str, run: Run | None) -> list[str]:
    """The page's first table: one row per notebook."""
    paper = SECTIONS[stem].paper if stem in SECTIONS else "–"
    if run is None:
        return [stem, paper, "not run yet", "–", "–", "–"]
    claims = run.metrics.get("claims")
    shown = f"`{run.name}`" + (f" and {len(run.ablation) - 1} more with another `{SECTIONS[stem].ablation}`"
                               if run.ablation else "")
    return [stem, paper, shown, run.finished[:10],
            run.wall_time or "–",
            f"{sum(c['holds'] for c in claims.values())} of {len(claims)}" if claims else "–"]


def write_report(root: Path, outputs: Path, docs: Path, profile: str = "laptop", max_width: int = 900) -> Path:
    """Writes `docs/results.md` and its figures `docs/results/<notebook>/*.png`; returns the page."""
    root = Path(root).resolve()
    stems = [p.stem for p in list_notebooks(root)]
    if not stems:
        raise RunnerError(f"no notebooks in {root / 'notebooks'}")
    if not Path(outputs).is_dir():
        raise RunnerError(f"no outputs directory {outputs}")
    if max_width < 100:
        raise RunnerError(f"--max-width must be at least 100 pixels, got {max_width}")
    runs = {stem: find_run(outputs, stem, profile) for stem in stems}
    for stem, run in runs.items():
        if run is not None and stem in SECTIONS and SECTIONS[stem].ablation:
            run.ablation = ablation_runs(outputs, run, SECTIONS[stem].ablation)
    for stale in (docs / "results").glob("*/*.png"):  # an earlier report's figures
        stale.unlink()
    body = [line for stem, run in runs.items()
            for line in _section(stem, run, root, outputs, docs, profile, max_width)]
    pictures = sorted((docs / "results").rglob("*.png"))
    size = sum(p.stat().st_size for p in pictures)
    summary = [_summary_row(stem, run) for stem, run in runs.items()]
    head = [
        "<!-- GENERATED by `make report` (diemlib/workbook/report.py) from outputs/: do not edit by hand. -->",
        "# Results",
        "",
        f"*Generated {datetime.now().astimezone().isoformat(timespec='minutes')} by "
        f"`make report PROFILE={profile}` from the runs under `outputs/` (git-ignored): **do not edit this "
        "file by hand**, run `make report` again. The paper is Rozet, Andry, Lanusse & Louppe, *Learning "
        "Diffusion Priors from Observations by Expectation Maximization*, NeurIPS 2024; its numbers below "
        "are copied from the table or figure named beside each.*",
        "",
        "What a run's numbers mean depends on its scale: "
        + "; ".join(f"`{name}`: {note}" for name, note in PROFILE_NOTES.items()) + ".",
        "",
        *_table(["notebook", "paper", "run shown", "finished", "wall time", "claims held"], summary),
        f"Figures: {len(pictures)} PNG files in `{docs.name}/results/`, {size / 1024:.0f} kB in all "
        f"(downscaled to at most {max_width} px wide).",
        "",
    ]
    page = docs / "results.md"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("\n".join(head + body), encoding="utf-8")
    return page


def main(argv: list[str] | None = None) -> int:
    """Command line of `make report`; returns the exit status (2: bad input, nothing written)."""
    ap = argparse.ArgumentParser(prog="python -m diemlib.workbook.report",
                                 description="Write docs/results.md from the runs under outputs/.")
    ap.add_argument("--profile", default="laptop",
                    help=f"the run shown for each notebook where it exists, else the first of {', '.join(FALLBACK)} "
                         "(default: laptop)")
    ap.add_argument("--root", type=Path, help="repository root (default: found from the working directory)")
    ap.add_argument("--outputs", type=Path, help="the runs (default: ROOT/outputs)")
    ap.add_argument("--docs", type=Path, help="where results.md and results/ go (default: ROOT/docs)")
    ap.add_argument("--max-width", type=int, default=900, help="figures wider than this are downscaled (pixels)")
    args = ap.parse_args(argv)
    root = (args.root or find_root()).resolve()
    try:
        page = write_report(root, args.outputs or root / "outputs", args.docs or root / "docs",
                            args.profile, args.max_width)
    except RunnerError as error:
        print(f"report: error: {error}", file=sys.stderr)
        return 2
    pictures = sorted((page.parent / "results").rglob("*.png"))
    print(f"wrote {page} and {len(pictures)} figures in {page.parent / 'results'} "
          f"({sum(p.stat().st_size for p in pictures) / 1024:.0f} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
