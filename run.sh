#!/usr/bin/env bash
# The two commands of the README:
#   ./run.sh up     install what is needed, then start the whole stack on embedded defaults
#   ./run.sh test   install what is needed (with test extras), then run the test suite
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
        .venv/bin/python -m pip install --quiet --upgrade pip
        .venv/bin/python -m pip install --quiet -e ".[$extras]" -e tools
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
        exec .venv/bin/python -m pytest "$@"
        ;;
    *)
        echo "usage: ./run.sh up|test [args...]" >&2
        exit 2
        ;;
esac
