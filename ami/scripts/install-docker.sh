#!/bin/sh
# Docker Engine with the buildx plugin.
set -eu
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends docker.io docker-buildx git ca-certificates
systemctl enable --now docker
docker buildx version
