"""absl flag parsing for the project's command lines, with `--help` exiting 0.

absl ends a `--help` (`-h`, `--helpfull`, ...) with exit status 1, the status of a bad
flag, so a script cannot tell asking for the usage from a mistake. Every `python -m
vit_jax.*` command parses its flags here instead: the usage exits 0, a bad flag keeps
absl's message and status (or the caller's).
"""

import sys

from absl import app

HELP_FLAGS = ('--help', '-?', '--helpfull', '--helpshort', '--helpxml')  # absl has no -h


def asked_for_help(argv) -> bool:
  """Whether the command line asks for the usage (before a `--` that ends the flags)."""
  args = list(argv[1:])
  if '--' in args:
    args = args[:args.index('--')]
  return any(a.split('=')[0] in HELP_FLAGS for a in args)


def parse_flags(argv, bad_flag_status: int = 1):
  """`app.parse_flags_with_usage(argv)`; exits 0 after the usage, `bad_flag_status` after
  absl printed a bad flag."""
  try:
    return app.parse_flags_with_usage(argv)
  except SystemExit as e:
    if e.code == 1:
      sys.exit(0 if asked_for_help(argv) else bad_flag_status)
    raise
