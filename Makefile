# spotbuild's entry points. Each target installs what it needs (idempotently) first.
#   make test   install the local farm's tools, then run every test
#   make bench  planner figures on a generated 100k-file monorepo; event stream throughput;
#               the controller's overhead and the bytes it ships for a one-file change
#   make demo   a real farm build of examples/monorepo on the local farm (EC2 emulated,
#               hosts in network namespaces, a loopback registry, this machine's Docker)

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
VENV := .venv
SHARED ?= ../shared
BENCH_REPO := target/bench/monorepo
# chromium (and a font) render the HTML cost report in a test.
APT_PACKAGES := docker-registry openssh-server openssh-client iproute2 busybox-static git curl python3 python3-venv chromium fonts-dejavu-core

.PHONY: test bench demo farm-deps apt-deps venv build docker-check

test: farm-deps
	cargo test --locked --all-targets

build:
	cargo build --locked

# The local farm: a registry v2 server, sshd, iproute2 and a static busybox from Debian,
# and the AWS emulator (moto) in a project-local venv. Tests start farms of their own.
# The Docker engine cannot be installed from here; it must be running.
farm-deps: apt-deps venv docker-check

docker-check:
	@docker info >/dev/null 2>&1 || { echo "error: the Docker engine is not reachable (docker info failed); builds and agent tests need it" >&2; exit 1; }

apt-deps:
	@missing=""; \
	for p in $(APT_PACKAGES); do dpkg -s "$$p" >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  sudo=""; [ "$$(id -u)" -eq 0 ] || sudo="sudo"; \
	  $$sudo apt-get update -qq; \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed:
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check 'moto[server]'
	touch $@

bench: farm-deps
	cargo build --locked --release
	scripts/bench-plan --shared $(SHARED) --repo $(BENCH_REPO) --binary target/release/spotbuild
	scripts/bench-events --binary target/release/spotbuild
	scripts/bench-controller --binary target/release/spotbuild

demo: farm-deps build
	scripts/demo
