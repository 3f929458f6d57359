#!/usr/bin/env bash
# The two commands of the README:
#   ./run.sh up     install what is needed, then start the whole stack on embedded defaults
#   ./run.sh test   install what is needed (with test extras), then run the test suite on every core
# Both install birdflow and its developer tools (tools/: `birdflow bench`, `birdflow drill`) in .venv, editable.
# Anything after the command is passed on (to `birdflow up` or to pytest).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

install() {
    local extras=$1 stamp=".venv/.installed-$1"
    if [ ! -x .venv/bin/python ]; then
        "$PYTHON" -m venv .venv
    fi
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ tools/pyproject.toml -nt "$stamp" ]; then
        echo "installing birdflow ($extras) and what it needs into .venv: a few minutes the first time" >&2
        .venv/bin/python -m pip install --quiet --upgrade pip
        # each package pip collects is listed as it goes; a failure stops here (pipefail) with pip's errors
        .venv/bin/python -m pip install --progress-bar off -e ".[$extras]" -e tools 2>&1 \
            | { grep -E --line-buffered "^(Collecting|Installing|Successfully|ERROR)" >&2 || true; }
        touch "$stamp"
    fi
}

command=${1:-}
shift || true
case "$command" in
    up)
        install runtime
        exec .venv/bin/birdflow up "$@"
        ;;
    test)
        install test
        # on every core (up to 4); a module's tests stay on one worker, since some share a server or the image
        exec .venv/bin/python -m pytest -n auto --maxprocesses=4 --dist loadscope "$@"
        ;;
    *)
        echo "usage: ./run.sh up|test [args...]" >&2
        exit 2
        ;;
esac
