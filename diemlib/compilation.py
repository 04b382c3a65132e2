r"""Compile once: JAX's persistent compilation cache, and a count of the programs JAX builds.

XLA compiling our programs (a sampler's loop around a U-Net and MMPS, the M-step's scanned Adam
steps) takes seconds to minutes on a CPU, and a notebook builds dozens of them. Importing
`diemlib` calls [`enable_cache`][], which turns on JAX's persistent compilation cache: every
compiled program is kept on disk, so a rerun of a notebook, a resumed run, or another notebook or
test with the same programs loads them instead of compiling again.

- **Where** ([`cache_directory`][]): the directory named by `DIEMLIB_COMPILATION_CACHE` (`0`,
  `off`, `false` or `no`: no cache at all), else the one JAX was given (`JAX_COMPILATION_CACHE_DIR`),
  else `$XDG_CACHE_HOME/diemlib/jax` (`~/.cache/diemlib/jax`). A directory that cannot be
  written gives one [`CompilationCacheWarning`][] and the run goes on, compiling as before.
- **What**: every program, however quick to compile or small (JAX's defaults skip programs
  compiled in under a second), up to [`MAX_BYTES`][] on disk; past that, the least recently used
  programs are deleted.
- **Programs with host callbacks.** jax 0.10 never writes a program that calls back to Python
  into the cache, and most of ours do: the progress bars' tick per sampler step
  (`diemlib.progress`), the network passes counted by `diemlib.eval.cost`. [`enable_cache`][]
  lifts that limit as JAX later did itself (jax-ml/jax#38405): the callbacks are not part of the
  compiled code, so a program read from the cache is loaded with the callbacks of the function
  being compiled now. Only a JAX whose functions have the signatures this was written for is
  changed; a JAX that caches such programs itself is left alone.
- **Several processes** share the directory safely: JAX reads and writes entries under a file
  lock, and in a multi-process run only process 0 writes.

[`compilations`][] counts, from the import of `diemlib`, the programs XLA compiled and those loaded
from the cache instead, with the seconds they took; `em.diem` records them per lap and `diem-run`
per run, in `metrics.json`.
"""

import dataclasses
import importlib.util
import inspect
import os
import tempfile
import threading
import warnings
from pathlib import Path

import jax

CACHE_VARIABLE = "DIEMLIB_COMPILATION_CACHE"
OFF = ("0", "off", "false", "no")
MAX_BYTES = 8 * 2**30  # the cache's size on disk; the least recently used programs go first


class CompilationCacheWarning(UserWarning):
    """The compilation cache cannot be used: programs are compiled in every run."""


def cache_directory() -> Path | None:
    """Where compiled programs are kept (see the module's text), or `None` when the cache is off."""
    chosen = os.environ.get(CACHE_VARIABLE, "").strip()
    if chosen.lower() in OFF:
        return None
    if chosen:
        return Path(chosen).expanduser()
    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diemlib" / "jax"


def enable_cache() -> Path | None:
    """Turns JAX's persistent compilation cache on in [`cache_directory`][], for every program.

    Call it before the first computation (importing `diemlib` does). Returns the directory, or
    `None` if the cache is off or the directory cannot be written (then warns, once).
    """
    path = cache_directory()
    if path is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        warnings.warn(
            f"compilation cache {path} is not writable ({error.strerror or error}): every program is compiled "
            f"again in every run; set {CACHE_VARIABLE} to a writable directory, or to 0",
            CompilationCacheWarning,
            stacklevel=2,
        )
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # no size limit either
    if importlib.util.find_spec("filelock") is not None:  # JAX needs it to lock and to evict
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    _cache_programs_with_host_callbacks()
    return path


_compiling = threading.local()  # the host callbacks of the program being compiled in this thread


class _WithCallbacks:
    """A backend whose `deserialize_executable` binds the given host callbacks (the rest delegated)."""

    def __init__(self, backend, callbacks):
        self._backend, self._callbacks = backend, list(callbacks)

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def deserialize_executable(self, serialized, executable_devices, compile_options=None):
        return self._backend.deserialize_executable(
            serialized, executable_devices, compile_options, host_callbacks=self._callbacks
        )


def _parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def _cache_programs_with_host_callbacks() -> None:
    """Lets JAX's persistent cache hold programs with host callbacks (see the module's text)."""
    from jax._src import compilation_cache, compiler
    from jax._src.lib import _jax

    if getattr(compiler.compile_or_get_cached, "diemlib_patched", False):
        return
    if "if host_callbacks:" not in inspect.getsource(compiler._cache_write):
        return  # this JAX caches them itself
    expected = (
        _parameters(compiler.compile_or_get_cached)[:5] == ["backend", "computation", "devices", "compile_options", "host_callbacks"]
        and _parameters(compiler._cache_write)[-1] == "host_callbacks"
        and _parameters(compilation_cache.get_executable_and_time) == ["cache_key", "compile_options", "backend", "executable_devices"]
        and "host_callbacks" in (_jax.Client.deserialize_executable.__doc__ or "")
    )
    if not expected:
        warnings.warn(
            f"jax {jax.__version__}: programs with host callbacks (progress bars, counted passes) are compiled in every run",
            CompilationCacheWarning,
            stacklevel=3,
        )
        return
    compile_or_get_cached, cache_write = compiler.compile_or_get_cached, compiler._cache_write
    get_executable_and_time = compilation_cache.get_executable_and_time

    def compiling(backend, computation, devices, compile_options, host_callbacks, *args, **kwargs):
        _compiling.callbacks = host_callbacks
        try:
            return compile_or_get_cached(backend, computation, devices, compile_options, host_callbacks, *args, **kwargs)
        finally:
            _compiling.callbacks = ()

    def writing(*args):  # the same entry as a program without callbacks: they are not in it
        return cache_write(*args[:-1], ())

    def reading(cache_key, compile_options, backend, executable_devices):
        callbacks = getattr(_compiling, "callbacks", ())
        backend = _WithCallbacks(backend, callbacks) if callbacks else backend
        return get_executable_and_time(cache_key, compile_options, backend, executable_devices)

    compiling.diemlib_patched = True
    compiler.compile_or_get_cached, compiler._cache_write = compiling, writing
    compilation_cache.get_executable_and_time = reading


@dataclasses.dataclass(frozen=True)
class Compilations:
    """Programs JAX built: `compiled` by XLA, `loaded` from the persistent cache instead, and the
    `seconds` both took (tracing not included). Subtract two counts for what happened between."""

    compiled: int = 0
    loaded: int = 0
    seconds: float = 0.0

    def __sub__(self, other: "Compilations") -> "Compilations":
        return Compilations(self.compiled - other.compiled, self.loaded - other.loaded, self.seconds - other.seconds)

    def __str__(self) -> str:
        return f"{self.compiled} programs compiled, {self.loaded} loaded from the cache, {self.seconds:.1f} s"


_total = Compilations()
_lock = threading.Lock()
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # every program, compiled or read from the cache
_HIT_EVENT = "/jax/compilation_cache/cache_hits"  # recorded, in the same thread, just before the one above


def compilations() -> Compilations:
    """The programs built in this process since `diemlib` was imported (see [`Compilations`][])."""
    return _total


def _on_event(event: str, **kwargs) -> None:
    if event == _HIT_EVENT:
        _compiling.hit = True


def _on_duration(event: str, seconds: float, **kwargs) -> None:
    global _total
    if event != _COMPILE_EVENT:
        return
    hit, _compiling.hit = getattr(_compiling, "hit", False), False
    with _lock:
        _total = Compilations(_total.compiled + (not hit), _total.loaded + hit, _total.seconds + seconds)


jax.monitoring.register_event_listener(_on_event)
jax.monitoring.register_event_duration_secs_listener(_on_duration)
