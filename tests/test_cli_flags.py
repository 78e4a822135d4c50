"""Every `python -m vit_jax.*` command: `--help` prints the usage and exits 0 (absl's own
exit status after the usage is 1, a bad flag's), a bad flag keeps a failing status."""

import subprocess
import sys

import pytest

from tests import subprocess_env
from vit_jax import cli_flags

# (module, a flag its usage lists, the exit status of an unknown flag)
_COMMANDS = [
    ('vit_jax.main', '--workdir', 3),
    ('vit_jax.predict', '--checkpoint', 2),
    ('vit_jax.visualize', '--checkpoint', 2),
    ('vit_jax.convert', '--to', 2),
    ('vit_jax.benchmark', '--compare', 2),
]


@pytest.mark.parametrize('module,flag,bad_status', _COMMANDS)
def test_help_exits_0_and_a_bad_flag_does_not(module, flag, bad_status):
  env = subprocess_env.cpu_env()
  helped = subprocess.run([sys.executable, '-m', module, '--help'], capture_output=True,
                          text=True, env=env, timeout=300)
  assert helped.returncode == 0, subprocess_env.failure(helped)
  assert flag in helped.stdout + helped.stderr
  bad = subprocess.run([sys.executable, '-m', module, '--no_such_flag_anywhere'],
                       capture_output=True, text=True, env=env, timeout=300)
  assert bad.returncode == bad_status, subprocess_env.failure(bad)
  assert 'no_such_flag_anywhere' in bad.stderr


@pytest.mark.parametrize('argv,asked', [
    (['prog', '--help'], True),
    (['prog', '-?'], True),
    (['prog', '-h'], False),  # absl defines no -h: an unknown flag, not a request
    (['prog', '--helpfull'], True),
    (['prog', '--config=x.py', '--helpshort'], True),
    (['prog', '--config=x.py'], False),
    (['prog', '--helpful'], False),  # a misspelling is a bad flag, not a request
    (['prog', '--', '--help'], False),  # after `--`, an argument of the program
])
def test_asked_for_help(argv, asked):
  assert cli_flags.asked_for_help(argv) == asked
