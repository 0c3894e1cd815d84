#!/bin/sh
# Nothing of the bake stays: the temporary key, logs, cloud-init's state (so the next
# boot runs its user data), the machine id, package caches.
set -eu
rm -f /tmp/spotbuild
apt-get clean
rm -rf /var/lib/apt/lists/*
cloud-init clean --logs --seed
truncate -s 0 /etc/machine-id
rm -f /home/ubuntu/.ssh/authorized_keys /root/.ssh/authorized_keys
rm -f /root/.bash_history /home/ubuntu/.bash_history
