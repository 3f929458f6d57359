#!/bin/sh
# Entrypoint of the birdflow image. It also runs outside Docker (the tests call it).
#   up (default) | worker | ingest | execute | backfill | ... : birdflow sub-commands
#   healthcheck : exit 0 when the ingest API answers /healthz
#   anything else is executed as given
set -eu

# settings.yaml on the data volume, if there is one; environment variables override it either way
if [ -z "${BIRDFLOW_SETTINGS:-}" ] && [ -f "${DATA_DIR:-/data}/settings.yaml" ]; then
    export BIRDFLOW_SETTINGS="${DATA_DIR:-/data}/settings.yaml"
fi

command="${1:-up}"

# a station that remote-writes metrics: (re)write the Prometheus agent's config from the settings
if [ "$command" = up ] && [ -n "${PROMETHEUS_REMOTE_WRITE_URL:-}" ]; then
    birdflow prometheus-config --output "${DATA_DIR:-/data}/prometheus-agent" >/dev/null
fi
case "$command" in
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
    up|worker|ingest|execute|backfill|detections|listen|bench|init|central-setup|blocks|prometheus-config)
        [ $# -gt 0 ] && shift
        exec birdflow "$command" "$@"
        ;;
    *)
        exec "$@"
        ;;
esac
