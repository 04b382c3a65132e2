"""Progress bars for long work: a widget in JupyterLab, plain throttled lines in headless logs.

Every long loop of `diemlib` (E-step batches and sampler steps, M-step steps, evaluations)
reports through [`progress`][], a `tqdm` bar whose display follows where the code runs:

- in a Jupyter kernel (JupyterLab, VS Code): tqdm's widget bar, updated in place;
- in a terminal: tqdm's text bar, rewritten in place;
- elsewhere (a headless log, `diem-run`, a batch job's output file): one plain line per
  update, at most every `DIEMLIB_PROGRESS_INTERVAL` seconds (default 30), plus a line when the
  bar starts and one when it ends, with no carriage returns or escape codes in the file.

Jitted loops (a sampler's steps, the M-step's scanned training steps) advance the innermost
bar opened with [`counting`][] through [`tick`][], a `jax.debug.callback` per step: no
recompilation, no synchronisation, and nothing happens when no bar counts.

The environment variable `DIEMLIB_PROGRESS` forces a mode: `auto` (default), `widget`,
`terminal`, `log` or `off`. `diem-run` sets `log` for the kernels it starts, so that the lines
reach its log and the executed notebook as ordinary output.
"""

import contextlib
import os
import sys

import jax

from tqdm.auto import tqdm as _auto_tqdm
from tqdm.std import tqdm as _std_tqdm

MODES = ("auto", "widget", "terminal", "log", "off")


class _Lines:
    """A file for tqdm that turns every refresh into one plain line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").replace("\x1b[A", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def mode() -> str:
    """The display mode in effect: `widget`, `terminal`, `log` or `off` (see the module's text)."""
    chosen = os.environ.get("DIEMLIB_PROGRESS", "auto").strip().lower() or "auto"
    if chosen not in MODES:
        raise ValueError(f"DIEMLIB_PROGRESS={chosen!r}: expected one of {', '.join(MODES)}")
    if chosen != "auto":
        return chosen
    if "ipykernel" in sys.modules:
        return "widget"
    return "terminal" if sys.stderr.isatty() else "log"


def progress(iterable=None, *, total: int | None = None, desc: str | None = None, unit: str = "it", **kwargs):
    """A progress bar over `iterable` (or for manual `update(n)` calls up to `total`).

    It is a `tqdm` object: `set_postfix(loss=...)`, `update(n)` and use as a context manager
    work as in tqdm; extra keyword arguments go to tqdm.
    """
    shown = mode()
    options = dict(total=total, desc=desc, unit=unit, dynamic_ncols=False, **kwargs)
    if shown == "off":
        return _std_tqdm(iterable, disable=True, **options)
    if shown == "log":
        interval = float(os.environ.get("DIEMLIB_PROGRESS_INTERVAL", "30"))
        options = {"mininterval": interval, "maxinterval": max(interval, 10.0), "ncols": 100, **options}
        return _std_tqdm(iterable, file=_Lines(sys.stderr), ascii=True, **options)
    if shown == "terminal":
        return _std_tqdm(iterable, file=sys.stderr, **options)
    return _auto_tqdm(iterable, **options)


_counting: list = []  # the bars that jitted loops advance, innermost last


def _advance() -> None:
    if _counting:
        _counting[-1].update(1)


def tick() -> None:
    """Inside traced code: advances the innermost [`counting`][] bar by one when this step runs."""
    jax.debug.callback(_advance)


@contextlib.contextmanager
def counting(total: int, desc: str, unit: str = "step", **kwargs):
    """A [`progress`][] bar that the [`tick`][]s of jitted code advance while the block runs.

    The bar is closed (its last line written) when the block ends.
    """
    with progress(total=total, desc=desc, unit=unit, **kwargs) as bar:
        _counting.append(bar)
        try:
            yield bar
        finally:
            _counting.remove(bar)
