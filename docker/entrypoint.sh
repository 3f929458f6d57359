#!/bin/sh
# Entrypoint of the birdflow image. It also runs outside Docker (the tests call it).
#   (nothing)       : birdflow up
#   healthcheck     : exit 0 when the ingest API answers /healthz
#   a birdflow command (up, init, review list, export ...): run in the data folder (DATA_DIR, the volume), so that
#                     the settings.yaml and .env there are read and `init` writes them there
#   another program : executed as given (sh, prefect, python, a path ...)
# No list of birdflow's commands is kept here: a word that is no program on PATH is birdflow's to take or refuse,
# and one that is both (init, on a machine with systemd) is birdflow's when birdflow knows it.
set -eu

is_program() {
    case "$1" in */*) [ -x "$1" ]; return ;; esac
    directories=$PATH
    while [ -n "$directories" ]; do
        directory=${directories%%:*}
        [ -f "${directory:-.}/$1" ] && [ -x "${directory:-.}/$1" ] && return 0
        [ "$directory" = "$directories" ] && break
        directories=${directories#*:}
    done
    return 1
}

birdflow_knows() {
    birdflow "$1" --help >/dev/null 2>&1
}

[ $# -gt 0 ] || set -- up
case "$1" in
    healthcheck)
        exec python -c "
import os, sys, httpx
url = 'http://127.0.0.1:%s/healthz' % os.environ.get('INGEST_PORT', '8000')
try:
    sys.exit(0 if httpx.get(url, timeout=5).status_code == 200 else 1)
except httpx.HTTPError as exc:
    print('unhealthy: %s' % exc)
    sys.exit(1)
"
        ;;
esac
if is_program "$1" && ! birdflow_knows "$1"; then
    exec "$@"
fi
mkdir -p "${DATA_DIR:-/data}"
DATA_DIR=$(cd "${DATA_DIR:-/data}" && pwd)
export DATA_DIR
cd "$DATA_DIR"
# a station that remote-writes metrics: (re)write the Prometheus agent's config from the settings
if [ "$1" = up ] && [ -n "${PROMETHEUS_REMOTE_WRITE_URL:-}" ]; then
    birdflow prometheus-config --output "$DATA_DIR/prometheus-agent" >/dev/null
fi
exec birdflow "$@"
