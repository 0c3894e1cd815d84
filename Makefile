# spotbuild's entry points. Each target installs what it needs (idempotently) first.
#   make test   install the local farm's tools, then run every test, and check that they
#               left nothing behind
#   make bench  planner figures on a generated 100k-file monorepo; event stream throughput;
#               the controller's overhead and the bytes it ships for a one-file change;
#               capacity error to on-demand fulfilment, and how soon the reaper finds an orphan;
#               deploy's promotion against docker pull + push, and bytes for a one-layer change;
#               a build archived against not, the archive's size, and watch's save-to-pushed
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
	scripts/bench-logs --binary target/release/spotbuild

demo: farm-deps build
	scripts/demo

# Bakes the instance images in your AWS account (needs packer and the aws CLI), one per
# architecture in ARCHES (x86_64, arm64: each boots only on its own instance types), then
# points each architecture's SSM parameter, AMI_PARAMETER_PREFIX-<arch>, which launches
# resolve, at its new image. See ami/README.md.
#   make ami AWS_REGION=us-east-2 REPOSITORY_URL=https://github.com/acme/monorepo.git
#   make ami AWS_REGION=us-east-2 REPOSITORY_URL=... ARCHES=arm64   (only the arm64 image)
# Each image carries a spotbuild built for its architecture: SPOTBUILD_BINARY_<arch>=PATH
# when given; otherwise x86_64 is this (x86_64) machine's release build and arm64 is
# cross-built for aarch64-unknown-linux-gnu, which needs that Rust target and the
# aarch64-linux-gnu-gcc linker.
ARCHES ?= x86_64 arm64
AMI_PARAMETER_PREFIX ?= /spotbuild/ami/latest
REPOSITORY_REF ?= main
AARCH64_TARGET := aarch64-unknown-linux-gnu
comma := ,
empty :=
space := $(empty) $(empty)
AMI_BINARY_x86_64 = $(abspath $(or $(SPOTBUILD_BINARY_x86_64),target/release/spotbuild))
AMI_BINARY_arm64 = $(abspath $(or $(SPOTBUILD_BINARY_arm64),target/$(AARCH64_TARGET)/release/spotbuild))
# packer's build names: amazon-ebs.<arch> (ami/spotbuild.pkr.hcl).
AMI_ONLY = $(subst $(space),$(comma),$(addprefix amazon-ebs.,$(strip $(ARCHES))))
ami:
	@test -n "$(AWS_REGION)" || { echo "make ami: set AWS_REGION" >&2; exit 2; }
	@test -n "$(REPOSITORY_URL)" || { echo "make ami: set REPOSITORY_URL (the monorepo to mirror)" >&2; exit 2; }
	@test -n "$(strip $(ARCHES))" || { echo "make ami: ARCHES is empty (x86_64, arm64 or both)" >&2; exit 2; }
	@for a in $(ARCHES); do case "$$a" in x86_64|arm64) ;; *) echo "make ami: ARCHES: unknown architecture $$a (x86_64 or arm64)" >&2; exit 2 ;; esac; done
	@case "$(AMI_PARAMETER_PREFIX)" in /*) ;; *) echo "make ami: AMI_PARAMETER_PREFIX is an SSM parameter path and starts with / (got $(AMI_PARAMETER_PREFIX))" >&2; exit 2 ;; esac
	@command -v packer >/dev/null || { echo "make ami: packer is not installed (https://developer.hashicorp.com/packer/install)" >&2; exit 2; }
	@command -v aws >/dev/null || { echo "make ami: the aws CLI is not installed (publishing the images needs it: https://aws.amazon.com/cli/)" >&2; exit 2; }
	@for a in $(ARCHES); do \
	  case "$$a" in x86_64) given="$(SPOTBUILD_BINARY_x86_64)" ;; arm64) given="$(SPOTBUILD_BINARY_arm64)" ;; esac; \
	  [ -z "$$given" ] || [ -f "$$given" ] || { echo "make ami: SPOTBUILD_BINARY_$$a=$$given is not a file" >&2; exit 2; }; \
	done
ifneq ($(filter x86_64,$(ARCHES)),)
ifeq ($(SPOTBUILD_BINARY_x86_64),)
	@[ "$$(uname -m)" = x86_64 ] || { echo "make ami: this machine is $$(uname -m), so its release build cannot go on the x86_64 image: set SPOTBUILD_BINARY_x86_64=PATH (a Linux x86_64 build of spotbuild), or ARCHES=arm64" >&2; exit 2; }
endif
endif
ifneq ($(filter arm64,$(ARCHES)),)
ifeq ($(SPOTBUILD_BINARY_arm64),)
	@missing=""; \
	[ -d "$$(rustc --print sysroot 2>/dev/null)/lib/rustlib/$(AARCH64_TARGET)" ] || \
	  missing="$$missing\n  the Rust target $(AARCH64_TARGET): rustup target add $(AARCH64_TARGET)"; \
	[ "$$(uname -m)" = aarch64 ] || command -v aarch64-linux-gnu-gcc >/dev/null || \
	  missing="$$missing\n  the linker aarch64-linux-gnu-gcc: apt-get install gcc-aarch64-linux-gnu (Debian, Ubuntu)"; \
	[ -z "$$missing" ] || { printf 'make ami: the arm64 image needs a Linux arm64 spotbuild. Give one with SPOTBUILD_BINARY_arm64=PATH, bake only x86_64 with ARCHES=x86_64, or install what cross-building it needs:%b\n' "$$missing" >&2; exit 2; }
endif
endif
ifneq ($(filter x86_64,$(ARCHES)),)
ifeq ($(SPOTBUILD_BINARY_x86_64),)
	cargo build --locked --release
endif
endif
ifneq ($(filter arm64,$(ARCHES)),)
ifeq ($(SPOTBUILD_BINARY_arm64),)
	$(if $(filter aarch64,$(shell uname -m)),,CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc) \
	  cargo build --locked --release --target $(AARCH64_TARGET)
endif
endif
	packer init ami
	packer build -only=$(AMI_ONLY) -var region=$(AWS_REGION) \
	  $(foreach a,$(ARCHES),-var spotbuild_binary_$(a)=$(AMI_BINARY_$(a))) \
	  -var repository_url=$(REPOSITORY_URL) -var repository_ref=$(REPOSITORY_REF) ami
	sh ami/publish.sh $(AWS_REGION) $(AMI_PARAMETER_PREFIX) $(ARCHES)
