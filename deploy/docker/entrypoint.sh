#!/bin/sh
# Container entrypoint: turns the image's environment into `atlas serve` flags, then execs
# the server so that it replaces this shell as the container's main process and receives
# SIGTERM itself (the graceful drain depends on that).
#
#   ATLAS_HOST          bind address (default 0.0.0.0: the container's network namespace)
#   ATLAS_PORT          port (default 8000; the HEALTHCHECK reads the same variable)
#   ATLAS_CONFIG        server TOML; passed as --config when the file exists
#                       (default /etc/atlas/atlas.toml, where Compose/Kubernetes mount it)
#   ATLAS_CHECKPOINT    checkpoint directory (image default: the embedded quickstart model,
#                       /opt/atlas/quickstart/checkpoint)
#   ATLAS_API_KEY       read by the server itself from the environment
#   ATLAS_API_KEY_FILE  file holding the key (Docker/Kubernetes secret); passed as --api-key-file
#
# Arguments given to `docker run IMAGE ...` are appended, so they override any of the above.
# It deliberately never echoes the API key and never writes it to disk.
set -eu

set -- --host "${ATLAS_HOST:-0.0.0.0}" --port "${ATLAS_PORT:-8000}" "$@"
config=${ATLAS_CONFIG:-/etc/atlas/atlas.toml}
if [ -f "$config" ]; then
    set -- --config "$config" "$@"
fi
if [ -n "${ATLAS_CHECKPOINT:-}" ]; then
    set -- --checkpoint "$ATLAS_CHECKPOINT" "$@"
fi
if [ -n "${ATLAS_API_KEY_FILE:-}" ]; then
    set -- --api-key-file "$ATLAS_API_KEY_FILE" "$@"
fi
exec atlas serve "$@"
