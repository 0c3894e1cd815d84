#!/bin/sh
# What each launch's user data (src/cloud/userdata.rs) runs must be on the image, and
# cloud-init must run user data on every new instance.
set -eu
for tool in shutdown poweroff ssh-keygen getent install systemctl cloud-init; do
  command -v "$tool" >/dev/null 2>&1 || { echo "missing on the image: $tool" >&2; exit 1; }
done
systemctl is-enabled cloud-init.service >/dev/null 2>&1 || systemctl is-enabled cloud-init-main.service >/dev/null
