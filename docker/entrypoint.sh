#!/bin/sh
# Entrypoint of the birdflow image. It also runs outside Docker (the tests call it).
#   up (default) | worker | ingest | init | sql | ... : birdflow sub-commands, run in the data folder
#       (DATA_DIR, the volume), so the settings.yaml and .env there are read and `init` writes them there
#   healthcheck : exit 0 when the ingest API answers /healthz
#   anything else is executed as given
set -eu

command="${1:-up}"
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
    up|worker|ingest|execute|backfill|detections|sql|listen|init|listeners|notify|central-setup|blocks|prometheus-config)
        [ $# -gt 0 ] && shift
        mkdir -p "${DATA_DIR:-/data}"
        DATA_DIR=$(cd "${DATA_DIR:-/data}" && pwd)
        export DATA_DIR
        cd "$DATA_DIR"
        # a station that remote-writes metrics: (re)write the Prometheus agent's config from the settings
        if [ "$command" = up ] && [ -n "${PROMETHEUS_REMOTE_WRITE_URL:-}" ]; then
            birdflow prometheus-config --output "$DATA_DIR/prometheus-agent" >/dev/null
        fi
        exec birdflow "$command" "$@"
        ;;
    *)
        exec "$@"
        ;;
esac
