#!/bin/sh
# certbot deploy hook: copy the renewed certificate where the gateway reads it and
# hand it over with a reload.
#   install -m 0755 contrib/tls/renew-hook.sh /etc/letsencrypt/renewal-hooks/deploy/gateway
#
# certbot runs it once per renewed certificate with RENEWED_LINEAGE set
# (/etc/letsencrypt/live/NAME). The files go to /etc/gateway/tls/NAME/, the key
# readable by group "gateway" only (see docs/tls-and-websockets.md: the service then
# runs as User=gateway, since a DynamicUser= uid cannot be given a key file).
#
# `systemctl reload` runs the unit's ExecReload=: `gateway check` first (an
# unreadable or mismatched pair is refused there, and the old one keeps serving),
# then SIGHUP. New connections get the new certificate; open ones keep theirs.
set -eu
: "${RENEWED_LINEAGE:?run me from certbot (--deploy-hook) or set RENEWED_LINEAGE}"
name=${RENEWED_LINEAGE##*/}
dir=/etc/gateway/tls/$name
install -d -m 0750 -o root -g gateway "$dir"
# The key first: a reload in between sees the old certificate with the new key,
# which `gateway check` refuses; the reload below sees the pair whole.
install -m 0640 -o root -g gateway "$RENEWED_LINEAGE/privkey.pem" "$dir/privkey.pem.new"
install -m 0644 -o root -g root "$RENEWED_LINEAGE/fullchain.pem" "$dir/fullchain.pem.new"
mv -f "$dir/privkey.pem.new" "$dir/privkey.pem"
mv -f "$dir/fullchain.pem.new" "$dir/fullchain.pem"
exec systemctl reload gateway.service
