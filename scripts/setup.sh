#!/usr/bin/env bash
# Creates the virtual environment and installs eventcast with every extra and
# the dev tools. Called by `make`; safe to run again.
set -euo pipefail
python=${1:-python3}
venv=${2:-.venv}
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade "pip>=25.1"
"$venv/bin/python" -m pip install --quiet -e ".[all]" --group dev
