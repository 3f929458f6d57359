#!/usr/bin/env bash
# Load a .env file (KEY=VALUE lines, as `birdflow init` writes) into balena fleet variables.
#   balena/env-to-fleet.sh <fleet> [.env]        # needs the balena CLI, logged in
#   DRY_RUN=1 balena/env-to-fleet.sh <fleet>     # print the commands instead
# Empty values and comments are skipped; quotes around values are removed.
set -euo pipefail
fleet=${1:?usage: env-to-fleet.sh <fleet> [env-file]}
file=${2:-.env}
[ -f "$file" ] || { echo "no such file: $file" >&2; exit 2; }
if [ -z "${DRY_RUN:-}" ] && ! command -v balena >/dev/null; then
    echo "the balena CLI is not installed (npm install -g balena-cli), or use DRY_RUN=1" >&2
    exit 2
fi
count=0
while IFS= read -r line || [ -n "$line" ]; do
    line="${line#"${line%%[![:space:]]*}"}"          # trim leading blanks
    case "$line" in ''|'#'*) continue ;; esac
    line="${line#export }"
    name="${line%%=*}"
    value="${line#*=}"
    [ "$name" = "$line" ] && { echo "skipping malformed line: $line" >&2; continue; }
    case "$value" in \"*\") value="${value:1:${#value}-2}" ;; \'*\') value="${value:1:${#value}-2}" ;; esac
    [ -z "$value" ] && continue
    if [[ ! "$name" =~ ^[A-Z_][A-Z0-9_]*$ ]]; then
        echo "skipping $name: fleet variable names are upper case" >&2
        continue
    fi
    if [ -n "${DRY_RUN:-}" ]; then
        printf 'balena env set %q %q --fleet %q\n' "$name" "$value" "$fleet"
    else
        balena env set "$name" "$value" --fleet "$fleet" --quiet
    fi
    count=$((count + 1))
done < "$file"
echo "$count variable(s) for fleet $fleet" >&2
