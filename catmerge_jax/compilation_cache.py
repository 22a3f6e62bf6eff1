"""JAX's persistent compilation cache in the user's cache folder: compile a merge's programs once per machine.

A merge runs a few dozen XLA programs; compiling them is most of a small model's first run. With the cache on,
the second run of the same kind of merge (same shapes, same options) loads them from disk instead.

* The ``catmerge`` command turns it on by itself. In Python, call :func:`enable_compilation_cache` once, before
  the first merge; importing ``catmerge_jax`` never changes JAX's configuration.
* The folder: ``$CATMERGE_COMPILATION_CACHE`` if it names one, else ``$XDG_CACHE_HOME/catmerge_jax/xla`` (by
  default ``~/.cache/catmerge_jax/xla``), in a subfolder per jax/jaxlib version and machine
  (:func:`machine_tag`). ``CATMERGE_COMPILATION_CACHE=0`` (or ``off``, ``false``, ``no``) turns it off.
* Safe across versions: JAX's own cache key hashes the program, the jaxlib version, the backend's platform
  version, ``XLA_FLAGS`` and the compile options; the subfolder adds the jax version and the CPU (model and
  instruction-set flags), so a home folder shared between machines never hands one CPU's machine code to another
  (XLA would refuse it, loudly, and compile again).
* The folder is made readable by its owner only (mode 0700): a compilation cache is code that JAX runs, so
  nobody else may write to it (JAX's documentation says the same). If ``filelock`` is installed, the cache keeps
  to :data:`MAX_BYTES` (least recently used entries go first); without it, delete the folder to clear it.
* If the user already set ``jax_compilation_cache_dir`` (e.g. ``JAX_COMPILATION_CACHE_DIR``), their cache and
  its settings are left as they are.

>>> import catmerge_jax as cm, tempfile
>>> folder = cm.enable_compilation_cache(tempfile.mkdtemp())   # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
import platform

ENV = "CATMERGE_COMPILATION_CACHE"
"""Environment variable: ``0``/``off``/``false``/``no`` disables the cache, a path chooses its folder."""

OFF_VALUES = ("0", "off", "false", "no")

MAX_BYTES = 2 << 30
"""Cap on the cache folder (2 GiB), enforced by JAX's LRU eviction when ``filelock`` is installed."""

MIN_COMPILE_SECONDS = 0.0
"""Every program is cached, however fast it compiled: a merge's many small programs (stacking, masks) are what a
first run spends its compile time on, and JAX's default threshold (1 s) would skip nearly all of them."""


def disabled_by_env(environ=os.environ) -> bool:
    """True when ``$CATMERGE_COMPILATION_CACHE`` turns the cache off."""
    return environ.get(ENV, "").strip().lower() in OFF_VALUES


def machine_tag() -> str:
    """A short fingerprint of this CPU: architecture, model name and instruction-set flags (Linux
    ``/proc/cpuinfo``; elsewhere ``platform.processor()``), so compiled code is only reused on a matching CPU."""
    parts = [platform.system(), platform.machine()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            seen = set()
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "flags", "Features", "CPU implementer", "CPU part") and key not in seen:
                    seen.add(key)
                    parts.append(f"{key}={value.strip()}")
    except OSError:
        parts.append(platform.processor())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def default_cache_dir(environ=os.environ) -> str:
    """``$CATMERGE_COMPILATION_CACHE`` (when it is a path), else ``$XDG_CACHE_HOME/catmerge_jax/xla`` or
    ``~/.cache/catmerge_jax/xla``, with a ``jax-<version>-jaxlib-<version>-<machine_tag>`` subfolder."""
    return os.path.join(_cache_root(environ), _version_folder())


def shapes_cache_dir(environ=os.environ) -> str | None:
    """Where ``catmerge`` keeps the parameter shapes of the models it read (a small JSON per model configuration,
    :func:`converters.keys.template_shapes`): the ``shapes-<version folder>`` sibling of :func:`default_cache_dir`'s
    folder, or ``None`` when ``$CATMERGE_COMPILATION_CACHE`` turns the caches off."""
    if disabled_by_env(environ):
        return None
    return os.path.join(_cache_root(environ), "shapes-" + _version_folder())


def _cache_root(environ) -> str:
    chosen = environ.get(ENV, "").strip()
    if chosen and chosen.lower() not in OFF_VALUES and chosen.lower() not in ("1", "on", "true", "yes"):
        return os.path.expanduser(chosen)
    return os.path.join(environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                        "catmerge_jax", "xla")


def _version_folder() -> str:
    import jax
    import jaxlib

    return f"jax-{jax.__version__}-jaxlib-{jaxlib.__version__}-{machine_tag()}"


def enable_compilation_cache(path: str | os.PathLike | None = None, *, respect_env: bool = True) -> str | None:
    """Turn on JAX's persistent compilation cache for this process; returns its folder, or ``None`` when it is
    off (``$CATMERGE_COMPILATION_CACHE=0`` with ``respect_env``, or the folder cannot be made).

    ``path``: the folder (default :func:`default_cache_dir`). A cache folder JAX was already given (by the user,
    or by an earlier call) is kept with its settings and returned. Every program is cached
    (:data:`MIN_COMPILE_SECONDS`). Call it before the first merge; later calls are cheap.
    """
    if respect_env and disabled_by_env():
        return None
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    folder = os.fspath(path) if path is not None else default_cache_dir()
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
    except OSError:
        return None  # e.g. a read-only home folder: run without the cache rather than fail the merge
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # -1: no size threshold either
    try:
        import filelock  # noqa: F401 — JAX's LRU eviction needs it
    except ImportError:
        pass
    else:
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    jax.config.update("jax_compilation_cache_dir", folder)
    return folder


__all__ = ["enable_compilation_cache", "default_cache_dir", "shapes_cache_dir", "machine_tag", "disabled_by_env", "ENV", "MAX_BYTES"]
