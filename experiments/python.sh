# Sourced by the experiment scripts: sets `py`, the Python that runs vit_jax: $PYTHON if
# set, else the active virtualenv's, else this checkout's .venv (the README's set-up),
# else `python`.
# shellcheck shell=bash
_checkout=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -n ${PYTHON:-} ]]; then
  py=$PYTHON
elif [[ -n ${VIRTUAL_ENV:-} && -x $VIRTUAL_ENV/bin/python ]]; then
  py=$VIRTUAL_ENV/bin/python
elif [[ -x $_checkout/.venv/bin/python ]]; then
  py=$_checkout/.venv/bin/python
else
  py=python
fi
export PYTHON=$py
