"""Flag parsing for train.py / eval.py: a bad `--config.key=value` is one clear line, not a traceback."""

import sys

from absl import flags


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
