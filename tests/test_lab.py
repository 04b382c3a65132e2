"""JupyterLab, as a newcomer meets it: every `notebooks/*.py` opens as a notebook.

Runs `scripts/check_lab.py`: JupyterLab on 127.0.0.1 with a fresh user state, each notebook
opened in headless Chromium by its URL and by a double-click, a notebook panel with rendered
Markdown cells asserted (not the text editor). Needs Debian's Chromium (`.ci/run` installs it).
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check_lab.py"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
LABCONFIG = Path(sys.prefix) / "etc" / "jupyter" / "labconfig" / "default_setting_overrides.json"


def test_project_setting_makes_jupytext_the_python_viewer():
    setting = ROOT / "jupyter-config" / "labconfig" / "default_setting_overrides.json"
    source = json.loads(setting.read_text())
    viewers = source["@jupyterlab/docmanager-extension:plugin"]["defaultViewers"]
    assert viewers == {"python": "Jupytext Notebook"}


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on PATH: the JupyterLab browser "
                    "check needs Debian's `apt-get install -y chromium chromium-driver` "
                    "(.ci/run does it)")
@pytest.mark.skipif(importlib.util.find_spec("jupyterlab") is None,
                    reason="JupyterLab is not installed (the `workbook` extra)")
def test_notebooks_open_as_notebooks_in_jupyterlab():
    if not LABCONFIG.is_file():
        pytest.fail(f"{LABCONFIG} is missing: `make env` installs the project's JupyterLab setting")
    env = {k: v for k, v in os.environ.items() if k != "JUPYTER_CONFIG_PATH"}
    r = subprocess.run([sys.executable, str(SCRIPT), "--timeout", "120"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900, check=False)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    opened = [line for line in r.stdout.splitlines() if line.startswith("ok ")]
    assert len(opened) == 2 * len(list((ROOT / "notebooks").glob("*.py"))), r.stdout
