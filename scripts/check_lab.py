#!/usr/bin/env python3
"""Browser check: JupyterLab opens the workbook's `notebooks/*.py` as notebooks.

Starts JupyterLab on 127.0.0.1 (a free port, a random token, a fresh user state: empty user
config, settings and workspaces, so only the project's own setting applies), opens every
`notebooks/*.py` in headless Chromium, and asserts that each one is shown as a notebook panel
with rendered Markdown cells, not as a text editor. Each notebook is opened twice, as a new user
would: through its URL `/lab/tree/notebooks/NAME.py` and by a double-click in the file browser.
Stops the server (and its kernels) and the browser it started. Exit status 0: every notebook
opened as a notebook; 1: one did not (what was shown instead is printed); 2: the check could not
run (no Chromium, JupyterLab did not start).

    .venv/bin/python scripts/check_lab.py            # JupyterLab as `jupyter lab` in the venv
    .venv/bin/python scripts/check_lab.py --make     # JupyterLab as `make lab` starts it
    make check-lab                                   # the same as the first

Chromium is Debian's (`apt-get install -y chromium chromium-driver`), driven through the Chrome
DevTools protocol with `websocket-client` (a dependency of jupyter_server): nothing downloads a
browser.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1400,1000",
]

# What the main area shows: the current tab's label and the kind of document under it.
STATE_JS = r"""
(() => {
  const dock = document.querySelector('#jp-main-dock-panel');
  if (!dock) return {ready: false, why: 'JupyterLab has not started'};
  const tab = dock.querySelector('.lm-TabBar-tab.lm-mod-current .lm-TabBar-tabLabel');
  const shown = [...dock.querySelectorAll('.jp-Document')].filter(
    w => !w.classList.contains('lm-mod-hidden') && w.offsetParent !== null);
  const doc = shown[0];
  if (!tab || !doc) return {ready: false, why: 'no document open', label: tab && tab.textContent};
  const md = [...doc.querySelectorAll('.jp-MarkdownCell.jp-mod-rendered .jp-RenderedMarkdown')];
  const h1 = doc.querySelector('.jp-MarkdownCell.jp-mod-rendered .jp-RenderedMarkdown h1');
  return {
    ready: true,
    label: tab.textContent,
    notebook: doc.classList.contains('jp-NotebookPanel'),
    editor: doc.classList.contains('jp-FileEditor') || !!doc.querySelector('.jp-FileEditor'),
    classes: doc.className,
    markdown_cells: doc.querySelectorAll('.jp-MarkdownCell').length,
    rendered_markdown: md.filter(m => m.textContent.trim().length > 0).length,
    code_cells: doc.querySelectorAll('.jp-CodeCell').length,
    heading: h1 ? h1.textContent.replace(/¶$/, '').trim() : null,
  };
})()
"""

# Double-clicks NAME in the file browser's listing (already showing notebooks/).
DBLCLICK_JS = r"""
((name) => {
  const items = [...document.querySelectorAll('.jp-DirListing-item')];
  const item = items.find(i => {
    const t = i.querySelector('.jp-DirListing-itemText');
    return t && t.textContent.trim() === name;
  });
  if (!item) return false;
  const r = item.getBoundingClientRect();
  const at = {bubbles: true, cancelable: true, view: window, button: 0,
              clientX: r.left + 10, clientY: r.top + r.height / 2};
  item.dispatchEvent(new MouseEvent('mousedown', at));
  item.dispatchEvent(new MouseEvent('mouseup', at));
  item.dispatchEvent(new MouseEvent('click', {...at, detail: 1}));
  item.dispatchEvent(new MouseEvent('dblclick', {...at, detail: 2}));
  return true;
})
"""


class CheckError(Exception):
    """The check could not run (as opposed to: it ran and a notebook opened as text)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # localhost only
        return r.read()


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stops a process started with start_new_session=True, with all its children."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


# --------------------------------------------------------------------------- JupyterLab


class Lab:
    """A JupyterLab server on 127.0.0.1 with a fresh user state, stopped on exit."""

    def __init__(self, root: Path, state: Path, via_make: bool, timeout: float):
        self.port, self.token = free_port(), secrets.token_hex(16)
        self.base = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        for var in ("JUPYTER_CONFIG_DIR", "JUPYTERLAB_SETTINGS_DIR", "JUPYTERLAB_WORKSPACES_DIR",
                    "JUPYTER_RUNTIME_DIR"):
            env[var] = str(state / var.lower())
        env.pop("JUPYTER_CONFIG_PATH", None)
        # checkpoints (written when a notebook opens) go to the temporary state, not the repo
        server_args = ["--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
                       f"--FileCheckpoints.checkpoint_dir={state / 'checkpoints'}",
                       "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
        if via_make:  # make lab adds --ip, --port, --no-browser (headless), --allow-root (root)
            make = shutil.which("make")
            if not make:
                raise CheckError("--make: no `make` on PATH")
            cmd = [make, "--no-print-directory", "lab", "LAB_IP=127.0.0.1",
                   f"LAB_PORT={self.port}", "LAB_ARGS=" + " ".join(server_args)]
        else:
            cmd = [sys.executable, "-m", "jupyterlab", "--ServerApp.ip=127.0.0.1",
                   f"--ServerApp.port={self.port}", "--no-browser", *server_args]
            if hasattr(os, "geteuid") and os.geteuid() == 0:
                cmd.append("--allow-root")
        self.log_path = state / "jupyterlab.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 (the server's lifetime)
        self.proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.command = " ".join(cmd)
        try:
            wait_for(self._ready, timeout, f"JupyterLab on {self.base} ({self.command})")
        except TimeoutError as e:
            self.stop()
            raise CheckError(f"{e}\n--- server log\n{self.log_path.read_text()[-3000:]}") from None

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise CheckError(f"JupyterLab exited with status {self.proc.returncode} "
                             f"({self.command})\n--- server log\n"
                             f"{self.log_path.read_text()[-3000:]}")
        try:
            http_get(f"{self.base}/api/status?token={self.token}", timeout=2)
            return True
        except (urllib.error.URLError, OSError):
            return False

    def url(self, path: str) -> str:
        return f"{self.base}/lab/{path}?reset&token={self.token}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:  # the clean way: the server shuts its kernels down, then exits
                req = urllib.request.Request(f"{self.base}/api/shutdown", method="POST",
                                             headers={"Authorization": f"token {self.token}"})
                urllib.request.urlopen(req, timeout=5).close()
                self.proc.wait(15)
            except (urllib.error.URLError, OSError, subprocess.TimeoutExpired):
                pass
        stop_group(self.proc)  # `make` or anything left in the group
        self.log.close()


# --------------------------------------------------------------------------- Chromium


class Browser:
    """Headless Chromium driven over the DevTools protocol (one page)."""

    def __init__(self, chromium: str, state: Path, timeout: float):
        import websocket  # websocket-client, a dependency of jupyter_server

        profile = state / "chromium-profile"
        profile.mkdir(parents=True)
        cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
               "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "about:blank"]
        self.log_path = state / "chromium.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 (the browser's lifetime)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        active = profile / "DevToolsActivePort"

        def port():
            if self.proc.poll() is not None:
                raise CheckError(f"Chromium exited with status {self.proc.returncode}:\n"
                                 f"{self.log_path.read_text()[-3000:]}")
            lines = active.read_text().split() if active.is_file() else []
            return int(lines[0]) if lines else None

        try:
            devtools = wait_for(port, timeout, "Chromium's DevTools port")
            pages = wait_for(
                lambda: [t for t in json.loads(http_get(f"http://127.0.0.1:{devtools}/json/list"))
                         if t.get("type") == "page"], timeout, "a Chromium page")
            self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"],
                                                  timeout=timeout, suppress_origin=True)
        except (TimeoutError, OSError) as e:
            self.stop()
            log = self.log_path.read_text()[-3000:]
            raise CheckError(f"Chromium did not start: {e}\n{log}") from None
        self._id = 0

    def send(self, method: str, **params):
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise CheckError(f"DevTools {method}: {msg['error']}")
                return msg.get("result", {})

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise CheckError(f"JavaScript error: {result['exceptionDetails']}")
        return result["result"].get("value")

    def navigate(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def stop(self) -> None:
        if getattr(self, "ws", None) is not None:
            with contextlib.suppress(Exception):  # closing anyway
                self.send("Browser.close")
            self.ws.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        stop_group(self.proc, grace=5)
        self.log.close()


# --------------------------------------------------------------------------- the check


def shown_state(browser: Browser, name: str, timeout: float) -> dict:
    """Waits until NAME's tab is current and its document has rendered; returns what it shows."""
    last = {}

    def settled():
        nonlocal last
        last = browser.evaluate(STATE_JS) or {}
        if not last.get("ready") or last.get("label") != name:
            return None
        if last.get("notebook") and not (last.get("rendered_markdown") and last.get("code_cells")):
            return None  # a notebook panel whose cells have not rendered yet
        if not last.get("notebook") and not last.get("editor"):
            return None  # some document is opening
        return last

    try:
        return wait_for(settled, timeout, f"{name} to open")
    except TimeoutError:
        return {**last, "timeout": True}


def verdict(state: dict) -> tuple[bool, str]:
    if state.get("timeout"):
        return False, f"did not open within the timeout (last seen: {state})"
    if state.get("editor") or not state.get("notebook"):
        return False, f"opened as a text editor, not a notebook ({state.get('classes')})"
    if not state.get("rendered_markdown"):
        return False, "notebook panel without rendered Markdown cells"
    return True, (f"notebook panel, {state['rendered_markdown']} rendered Markdown cells, "
                  f"{state['code_cells']} code cells; heading: {state['heading']!r}")


def check(notebooks: list[Path], root: Path, browser: Browser, lab: Lab, timeout: float) -> bool:
    ok = True
    for nb in notebooks:
        rel = nb.relative_to(root).as_posix()
        # 1. the URL a link or the README points to
        browser.navigate(lab.url(f"tree/{rel}"))
        good, text = verdict(shown_state(browser, nb.name, timeout))
        print(f"{'ok  ' if good else 'FAIL'} {rel} via /lab/tree/{rel}: {text}", flush=True)
        ok &= good
        # 2. a double-click in the file browser
        browser.navigate(lab.url(f"tree/{nb.parent.relative_to(root).as_posix()}"))
        try:
            dblclick = f"{DBLCLICK_JS}({json.dumps(nb.name)})"
            wait_for(lambda js=dblclick: browser.evaluate(js), timeout,
                     f"{nb.name} in the file browser")
            good, text = verdict(shown_state(browser, nb.name, timeout))
        except TimeoutError as e:
            good, text = False, str(e)
        print(f"{'ok  ' if good else 'FAIL'} {rel} via a double-click in the file browser: {text}",
              flush=True)
        ok &= good
    return ok


def find_chromium(given: str | None) -> str | None:
    for candidate in ([given] if given else ["chromium", "chromium-browser"]):
        path = shutil.which(candidate) if candidate else None
        if path:
            return path
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("notebooks", nargs="*", type=Path,
                    help="notebooks to open (default: every notebooks/*.py)")
    ap.add_argument("--make", action="store_true",
                    help="start JupyterLab with `make lab` instead of `python -m jupyterlab`")
    ap.add_argument("--chromium", help="the Chromium binary (default: chromium on PATH)")
    ap.add_argument("--timeout", type=float, default=90.0,
                    help="seconds to wait for the server, the browser and each notebook")
    ap.add_argument("--keep", action="store_true", help="keep the temporary state (logs)")
    args = ap.parse_args(argv)

    chromium = find_chromium(args.chromium)
    if not chromium:
        print("check_lab: no Chromium (Debian: apt-get install -y chromium chromium-driver)",
              file=sys.stderr)
        return 2
    notebooks = [p.resolve() for p in args.notebooks] or sorted((ROOT / "notebooks").glob("*.py"))
    if not notebooks:
        print("check_lab: no notebooks/*.py to open", file=sys.stderr)
        return 2
    state = Path(tempfile.mkdtemp(prefix="check-lab-"))
    lab = browser = None
    try:
        lab = Lab(ROOT, state, args.make, args.timeout)
        print(f"JupyterLab: {lab.base} ({'make lab' if args.make else 'python -m jupyterlab'})",
              flush=True)
        browser = Browser(chromium, state, args.timeout)
        ok = check(notebooks, ROOT, browser, lab, args.timeout)
    except CheckError as e:
        print(f"check_lab: {e}", file=sys.stderr)
        return 2
    finally:
        if browser is not None:
            browser.stop()
        if lab is not None:
            lab.stop()
        if args.keep:
            print(f"state and logs kept in {state}")
        else:
            shutil.rmtree(state, ignore_errors=True)
    print("every notebook opened as a notebook" if ok else "some notebooks opened as text",
          flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
