#!/bin/sh
# Install gateway as a socket-activated systemd service:
#   - a virtualenv in /opt/gateway (Debian 12 and Ubuntu refuse `pip install` into the
#     system Python: PEP 668 "externally-managed-environment"; needs python3-venv),
#   - gateway.service, gateway.socket, gateway-admin.socket in /etc/systemd/system,
#   - the safe example config as /etc/gateway/routes.toml, unless one is there already.
#
# Usage, as root from the source tree:  contrib/systemd/install.sh [--dry-run]
# --dry-run prints the commands instead of running them.
set -eu

PREFIX=/opt/gateway
UNIT_DIR=/etc/systemd/system
CONF_DIR=/etc/gateway
HERE=$(cd "$(dirname "$0")" && pwd)
SOURCE=$(cd "$HERE/../.." && pwd)

run=""
case "${1:-}" in
    --dry-run) run=echo ;;
    "") ;;
    *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac

# DynamicUser= runs the gateway under a uid with no fixed name: everything it reads must
# be readable by others, whatever root's umask.
umask 022

$run python3 -m venv "$PREFIX"
$run "$PREFIX/bin/pip" install --upgrade "$SOURCE"
$run install -m 0644 "$HERE/gateway.service" "$HERE/gateway.socket" \
    "$HERE/gateway-admin.socket" "$UNIT_DIR/"
$run install -d -m 0755 "$CONF_DIR"
if [ -e "$CONF_DIR/routes.toml" ]; then
    echo "keeping the existing $CONF_DIR/routes.toml" >&2
else
    $run install -m 0644 "$HERE/routes.toml" "$CONF_DIR/routes.toml"
fi
$run "$PREFIX/bin/gateway" check -c "$CONF_DIR/routes.toml"
$run systemctl daemon-reload
$run systemctl enable --now gateway.service
