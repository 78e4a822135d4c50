"""The README opens with the two set-up commands, and CI runs the README's test command."""

import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_opens_with_two_commands():
  readme = (ROOT / 'README.md').read_text()
  first_section = readme.split('\n## ')[0]
  blocks = re.findall(r'```bash\n(.*?)```', first_section, flags=re.S)
  assert len(blocks) == 2, blocks
  assert all(len(b.strip().splitlines()) == 1 for b in blocks)
  assert 'python -m vit_jax.main --config=' in blocks[0]
  assert 'pytest' in blocks[1] and "'.[test]'" in blocks[1]


def test_ci_extracts_the_readme_test_command():
  script = ROOT / '.ci' / 'run'
  # Run only the extraction part of .ci/run and compare with the README block.
  text = script.read_text()
  extraction = re.search(r'cmd=\$\((.*)\)\n', text).group(1)
  out = subprocess.run(['bash', '-c', extraction], cwd=ROOT, capture_output=True, text=True,
                       check=True).stdout.strip()
  readme = (ROOT / 'README.md').read_text()
  block = re.search(r'<!-- test-command -->\n```bash\n(.*?)\n```', readme, flags=re.S).group(1)
  assert out == block.strip()


def test_the_longest_first_modules_exist_and_ci_keeps_their_order():
  import conftest  # pylint: disable=import-outside-toplevel
  missing = [m for m in conftest._LONGEST_FIRST if not (ROOT / m).is_file()]  # pylint: disable=protected-access
  assert not missing, f'tests/conftest.py _LONGEST_FIRST names missing modules: {missing}'
  readme = (ROOT / 'README.md').read_text()
  block = re.search(r'<!-- test-command -->\n```bash\n(.*?)\n```', readme, flags=re.S).group(1)
  assert '--dist loadscope --no-loadscope-reorder' in block
