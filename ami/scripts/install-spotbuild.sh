#!/bin/sh
# The spotbuild binary (the agent), its user, its directories, and one BuildKit builder
# (docker-container driver, so the agent can export a registry layer cache) that both the
# SSH user and root (SSM runs commands as root) use.
set -eu
: "${SPOTBUILD_USER:?}" "${SPOTBUILD_ARCH:?}"

# The image, its base and the binary must be of one architecture: a swapped binary or
# base image parameter fails here, by name, rather than as an exec format error.
case $(dpkg --print-architecture) in
  amd64) os_arch=x86_64 elf_machine=3e ;;
  arm64) os_arch=arm64 elf_machine=b7 ;;
  *) echo "unsupported architecture: $(dpkg --print-architecture)" >&2; exit 1 ;;
esac
[ "$os_arch" = "$SPOTBUILD_ARCH" ] || { echo "the $SPOTBUILD_ARCH image's base image is $os_arch" >&2; exit 1; }
# ELF e_machine (offset 18, little-endian): 0x3e x86-64, 0xb7 AArch64.
machine=$(od -An -tx1 -j18 -N1 /tmp/spotbuild | tr -d ' \n')
[ "$machine" = "$elf_machine" ] || { echo "the spotbuild binary given for $SPOTBUILD_ARCH is not a Linux $SPOTBUILD_ARCH build (ELF machine 0x$machine)" >&2; exit 1; }

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
