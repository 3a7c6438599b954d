"""JAX's persistent compilation cache for every entry point (time to first step).

A rerun of the same step on the same machine loads the compiled executable instead of
compiling it again. Set up by ``research.runtime.setup`` before JAX is imported; this
module imports nothing of ours, so the process setup stays at the bottom of the
import graph.
"""

from __future__ import annotations

import os

CACHE_ENV = 'JAX_COMPILATION_CACHE_DIR'
CACHE_OFF_ENV = 'RESEARCH_COMPILATION_CACHE'  # '0': no persistent compilation cache.
CACHE_SIZE_ENV = 'JAX_COMPILATION_CACHE_MAX_SIZE'
CACHE_MAX_BYTES = 2 << 30  # LRU-evicted beyond 2 GiB.


def default_cache_dir() -> str:
  root = os.environ.get('XDG_CACHE_HOME', os.path.expanduser('~/.cache'))
  return os.path.join(root, 'research', 'jax_compilation_cache')


def enable_compilation_cache() -> str | None:
  """Points JAX's persistent compilation cache at the user cache dir (before jax is
  imported: JAX reads ``JAX_COMPILATION_CACHE_DIR`` at import). An explicit
  ``JAX_COMPILATION_CACHE_DIR`` wins; ``RESEARCH_COMPILATION_CACHE=0`` turns it off.
  JAX caches only compilations longer than ``jax_persistent_cache_min_compile_time_secs``
  (1 s), so small test jits never reach the disk. Returns the directory, or None."""
  if os.environ.get(CACHE_OFF_ENV, '1') == '0':
    return None
  if os.environ.get(CACHE_ENV):
    return os.environ[CACHE_ENV]  # The user's own cache, configured as they set it.
  # Our directory always gets a size bound: it turns on JAX's LRU eviction, which also
  # takes a file lock around reads and writes (without it concurrent processes can see
  # a half-written entry). Not imposed on a user's directory: JAX's eviction fails to
  # write into a directory whose entries were written without it (no atime files).
  os.environ.setdefault(CACHE_SIZE_ENV, str(CACHE_MAX_BYTES))
  os.environ[CACHE_ENV] = default_cache_dir()
  return os.environ[CACHE_ENV]
