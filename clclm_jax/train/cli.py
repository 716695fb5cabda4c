"""Entry-point helpers for train.py / eval.py: one-line flag errors and JAX's persistent compilation cache."""

import pathlib
import sys

import jax
from absl import flags

from clclm_jax.model import loading


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with unknown config keys reported by name."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    bad = [a for a in argv[1:] if a.startswith("--config.")]
    sys.exit(f"error: config has no field '{str(e).strip(chr(34) + chr(39))}' (overrides given: {' '.join(bad)}); "
             "see configs/base.py for the valid keys")
  except flags.Error as e:
    sys.exit(f"error: {e}")


def enable_compilation_cache(min_compile_s: float = 0.5, max_bytes: int = 2 * 2**30) -> pathlib.Path:
  """Keeps compiled XLA programs in $CLCLM_CACHE/xla (default ~/.cache/clclm_jax/xla), so eval.py, resumed and
  repeated runs skip the compiles train.py already paid for; beyond `max_bytes` the least recently used go."""
  path = loading.cache_root() / "xla"
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_s)
  jax.config.update("jax_compilation_cache_max_size", max_bytes)
  return path
