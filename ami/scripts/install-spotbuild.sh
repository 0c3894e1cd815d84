#!/bin/sh
# The spotbuild binary (the agent), its user, its directories, and one BuildKit builder
# (docker-container driver, so the agent can export a registry layer cache) that both the
# SSH user and root (SSM runs commands as root) use.
set -eu
: "${SPOTBUILD_USER:?}"
install -m 0755 -o root -g root /tmp/spotbuild /usr/local/bin/spotbuild
/usr/local/bin/spotbuild --version
if ! id "$SPOTBUILD_USER" >/dev/null 2>&1; then
  useradd --create-home --shell /bin/bash --groups docker "$SPOTBUILD_USER"
fi
# Keys only: no password can ever log in.
passwd --lock "$SPOTBUILD_USER"
install -d -m 0750 -o "$SPOTBUILD_USER" -g "$SPOTBUILD_USER" /var/lib/spotbuild /var/lib/spotbuild/builds

# One buildx configuration, shared through ~/.docker/buildx of both users.
shared=/var/lib/spotbuild/buildx
install -d -m 2770 -o root -g docker "$shared"
home=$(getent passwd "$SPOTBUILD_USER" | cut -d: -f6)
for h in /root "$home"; do
  install -d -m 0700 "$h/.docker"
  ln -sfn "$shared" "$h/.docker/buildx"
done
chown "$SPOTBUILD_USER:$SPOTBUILD_USER" "$home/.docker"
(umask 007 && BUILDX_CONFIG="$shared" docker buildx create --name spotbuild --driver docker-container --bootstrap --use)
chgrp -R docker "$shared"
chmod -R g+rwX "$shared"
su - "$SPOTBUILD_USER" -c 'docker buildx inspect spotbuild >/dev/null'

# SSM transport: the agent that runs commands (on Ubuntu's AWS images, a snap).
if command -v snap >/dev/null 2>&1 && snap list amazon-ssm-agent >/dev/null 2>&1; then
  snap start --enable amazon-ssm-agent
fi
