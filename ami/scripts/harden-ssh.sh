#!/bin/sh
# sshd: keys only, no root login, no forwarding, only the spotbuild user. Host keys are
# removed: each launch's user data installs the one the controller pins.
set -eu
: "${SPOTBUILD_USER:?}"
install -d -m 0755 /etc/ssh/sshd_config.d
cat > /etc/ssh/sshd_config.d/50-spotbuild.conf <<CONF
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
PubkeyAuthentication yes
AllowUsers $SPOTBUILD_USER
AllowAgentForwarding no
AllowTcpForwarding no
X11Forwarding no
PermitTunnel no
MaxAuthTries 3
LoginGraceTime 30
CONF
passwd --lock root
sshd -t
rm -f /etc/ssh/ssh_host_*_key /etc/ssh/ssh_host_*_key.pub
