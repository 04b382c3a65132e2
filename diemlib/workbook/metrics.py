"""What a notebook reports: `metrics.json` in its output directory, written atomically."""

import json
import math
import sys
from pathlib import Path

from ..em.checkpoint import atomic_write_json


def write_metrics(out_dir, metrics: dict | None = None, **more) -> dict:
    """Merges numbers into `<out_dir>/metrics.json` and returns the whole file's content.

    In a multi-process run only process 0 writes; the others return what the file would hold.

    Arrays and numpy/JAX scalars become (nested lists of) Python numbers; non-finite floats
    are written as strings (`"nan"`, `"inf"`) so that the file stays valid JSON.
    """
    path = Path(out_dir) / "metrics.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(_jsonable({**(metrics or {}), **more}))
    if _writes_files():
        atomic_write_json(path, data)
    return data


def _writes_files() -> bool:
    """False in the processes but 0 of a multi-process run (`diemlib.em.distributed`)."""
    if "jax" not in sys.modules:  # JAX never imported: one process
        return True
    from ..em.distributed import writes_files

    return writes_files()


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "tolist"):
        return _jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x
