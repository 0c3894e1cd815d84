# spotbuild's entry points. Each target installs what it needs (idempotently) first.
#   make test   install the local farm's tools, then run every test, and check that they
#               left nothing behind
#   make bench  planner figures on a generated 100k-file monorepo; event stream throughput;
#               the controller's overhead and the bytes it ships for a one-file change;
#               capacity error to on-demand fulfilment, and how soon the reaper finds an orphan;
#               deploy's promotion against docker pull + push, and bytes for a one-layer change
#   make demo   a real farm build of examples/monorepo on the local farm (EC2 emulated,
#               hosts in network namespaces, a loopback registry, this machine's Docker)
#   make chaos  the whole lifecycle chaos matrix (every phase × every fault) on the local farm
#   make reaper-zip  the reaper's Lambda function for terraform (target/lambda/reaper.zip)

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
VENV := .venv
SHARED ?= ../shared
BENCH_REPO := target/bench/monorepo
# chromium (and a font) render the HTML cost report in a test.
APT_PACKAGES := docker-registry openssh-server openssh-client iproute2 busybox-static git curl python3 python3-venv chromium fonts-dejavu-core shellcheck
# Infrastructure checks: Terraform and Packer parsed with python-hcl2, Terraform scanned by
# checkov, in a venv of their own (pinned: the tests read python-hcl2's output shape).
VENV_INFRA := .venv-infra
INFRA_PIP := python-hcl2==8.1.4 checkov==3.3.30

# Debian's arm64 busybox, unpacked and never run: the multi-architecture tests build a real
# arm64 image from it here.
ARM64_BUSYBOX := target/test-deps/arm64/busybox

.PHONY: test bench demo chaos reaper-zip farm-deps infra-deps apt-deps venv build docker-check ami

# Fails too when the tests left an image, a container, a farm's namespace or link, or a
# process of theirs on this machine (what was there before is not blamed).
test: farm-deps infra-deps $(ARM64_BUSYBOX)
	rm -f target/tmp/chaos-matrix.txt
	scripts/check-leftovers cargo test --locked --all-targets
	@cat target/tmp/chaos-matrix.txt 2>/dev/null || true

build:
	cargo build --locked

$(ARM64_BUSYBOX):
	scripts/fetch-arm64-busybox $@

# Every phase × every fault of the lifecycle on the local farm (make test runs a sample).
chaos: farm-deps
	SPOTBUILD_CHAOS=full scripts/check-leftovers cargo test --locked --test integration -- chaos:: --nocapture

# The release binary as `bootstrap` in a zip: terraform's var.reaper_zip.
reaper-zip: APT_PACKAGES := zip binutils
reaper-zip: apt-deps
	cargo build --locked --release
	scripts/package-reaper target/release/spotbuild target/lambda/reaper.zip

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

infra-deps: apt-deps $(VENV_INFRA)/.installed

$(VENV_INFRA)/.installed:
	python3 -m venv $(VENV_INFRA)
	$(VENV_INFRA)/bin/pip install -q --disable-pip-version-check $(INFRA_PIP)
	touch $@

$(VENV)/.installed:
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check 'moto[server]'
	touch $@

bench: farm-deps
	cargo build --locked --release
	scripts/bench-plan --shared $(SHARED) --repo $(BENCH_REPO) --binary target/release/spotbuild
	scripts/bench-events --binary target/release/spotbuild
	scripts/bench-controller --binary target/release/spotbuild
	scripts/bench-lifecycle --binary target/release/spotbuild
	scripts/bench-deploy --binary target/release/spotbuild

demo: farm-deps build
	scripts/demo

# Bakes the instance image in your AWS account (needs packer and the aws CLI), then points
# the SSM parameter that launches resolve at it. See ami/README.md.
#   make ami AWS_REGION=us-east-2 REPOSITORY_URL=https://github.com/acme/monorepo.git
AMI_PARAMETER ?= /spotbuild/ami/latest
REPOSITORY_REF ?= main
ami:
	@test -n "$(AWS_REGION)" || { echo "make ami: set AWS_REGION" >&2; exit 2; }
	@test -n "$(REPOSITORY_URL)" || { echo "make ami: set REPOSITORY_URL (the monorepo to mirror)" >&2; exit 2; }
	@command -v packer >/dev/null || { echo "make ami: packer is not installed (https://developer.hashicorp.com/packer/install)" >&2; exit 2; }
	cargo build --locked --release
	packer init ami
	packer build -var region=$(AWS_REGION) -var spotbuild_binary=$(CURDIR)/target/release/spotbuild \
	  -var repository_url=$(REPOSITORY_URL) -var repository_ref=$(REPOSITORY_REF) ami
	sh ami/publish.sh $(AWS_REGION) $(AMI_PARAMETER)
