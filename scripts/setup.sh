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
# The JavaScript SDK that tests/js runs against the hub (skipped without node and npm).
js_dir="$(dirname "$0")/../tests/js"
if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
    js_stamp="$js_dir/node_modules/.eventcast-installed"
    if [ ! -f "$js_stamp" ] || [ "$js_dir/package.json" -nt "$js_stamp" ] \
        || { [ -f "$js_dir/package-lock.json" ] && [ "$js_dir/package-lock.json" -nt "$js_stamp" ]; }; then
        npm install --no-audit --no-fund --loglevel=error --prefix "$js_dir"
        touch "$js_stamp"
    fi
fi
# The headless browser of tests/server/test_browser.py: Debian's chromium, driven by playwright
# (`playwright install` is never run; the tests use /usr/bin/chromium).
if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" -eq 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
    else
        echo "note: /usr/bin/chromium is missing and neither root nor sudo is available;" >&2
        echo "      install Debian's chromium package to run the browser tests (they are skipped)." >&2
    fi
fi
