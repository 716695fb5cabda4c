"""Entry-point helpers for train.py / eval.py: one-line flag errors and JAX's persistent compilation cache."""

import functools
import pathlib
import sys

import jax
from absl import flags

from clclm_jax.data.errors import DataError
from clclm_jax.model import loading
from clclm_jax.model.errors import ModelError
from clclm_jax.train.errors import ConfigError

USER_ERRORS = (ConfigError, DataError, ModelError, FileNotFoundError, PermissionError)


def clear_errors(main):
  """`main` with errors in what the user gave (a config value, a data record, a model file, a path) printed as
  their one-line message, without a traceback; Ctrl-C outside training steps (which save and stop, as on SIGTERM)
  exits with one line too."""
  @functools.wraps(main)
  def run(argv):
    try:
      return main(argv)
    except USER_ERRORS as e:
      sys.exit(f"error: {e}")
    except KeyboardInterrupt:
      print("interrupted: run the same command again to go on from the last checkpoint", file=sys.stderr)
      sys.exit(130)
  return run


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with unknown config keys reported by name."""
  try:
    rest = flags.FLAGS(argv)
    if "config" in flags.FLAGS:  # a config file that cannot be read fails later, with a long traceback
      given = (flags.FLAGS["config"].config_filename or "").split(":")[0]
      if given and not pathlib.Path(given).is_file():
        sys.exit(f"error: --config={given}: no such file (run from the repository root, or give the config "
                 "file's path)")
    return rest
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
  drop_unpaired_cache_files(path)
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_s)
  jax.config.update("jax_compilation_cache_max_size", max_bytes)
  return path


def drop_unpaired_cache_files(path: pathlib.Path) -> list[pathlib.Path]:
  """Deletes `<key>-cache` files without their `<key>-atime` (written before the size cap, or left by a
  concurrent eviction) and vice versa: JAX's size-capped cache fails every write while one is there."""
  dropped = []
  pairs = {"-cache": "-atime", "-atime": "-cache"}
  for f in sorted(path.glob("*-cache")) + sorted(path.glob("*-atime")):
    if not f.with_name(f.name[:-6] + pairs[f.name[-6:]]).exists():
      f.unlink(missing_ok=True)
      dropped.append(f)
  return dropped
