# The spotbuild build instance images, one per architecture (x86_64 and arm64/Graviton):
# Docker with buildx and a BuildKit builder, the spotbuild binary (the agent) built for
# that architecture, a git mirror of the monorepo whose commit is recorded (so only what
# it lacks is shipped), hardened sshd, and the tools the launch's user data uses
# (cloud-init, shutdown, ssh-keygen). An AMI boots on one architecture only, so each is
# baked on a build instance of its own architecture from a base image of that architecture.
# Build them with `make ami` (see ami/README.md); `-only=amazon-ebs.<arch>` bakes one.

packer {
  required_plugins {
    amazon = {
      source  = "github.com/hashicorp/amazon"
      version = ">= 1.3.0"
    }
  }
}

variable "region" {
  type        = string
  description = "Region to bake in (the AMIs are used there)."
}

variable "subnet_id" {
  type        = string
  default     = null
  description = "Subnet for the temporary build instances [default: the default VPC's]."
}

variable "instance_type_x86_64" {
  type        = string
  default     = "m7a.2xlarge"
  description = "The x86_64 image's temporary build instance type."
}

variable "instance_type_arm64" {
  type        = string
  default     = "m7g.2xlarge"
  description = "The arm64 image's temporary build instance type (Graviton)."
}

variable "base_ami_parameter_x86_64" {
  type        = string
  default     = "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id"
  description = "SSM parameter naming the x86_64 base image (Ubuntu 24.04 LTS, amd64)."
}

variable "base_ami_parameter_arm64" {
  type        = string
  default     = "/aws/service/canonical/ubuntu/server/24.04/stable/current/arm64/hvm/ebs-gp3/ami-id"
  description = "SSM parameter naming the arm64 base image (Ubuntu 24.04 LTS, arm64)."
}

# Each binary is needed only when its architecture is baked: `-only=amazon-ebs.arm64`
# leaves the x86_64 one unset.
variable "spotbuild_binary_x86_64" {
  type        = string
  default     = ""
  description = "Path to a Linux x86_64 release build of spotbuild (target/release/spotbuild)."
}

variable "spotbuild_binary_arm64" {
  type        = string
  default     = ""
  description = "Path to a Linux arm64 release build of spotbuild (target/aarch64-unknown-linux-gnu/release/spotbuild)."
}

variable "repository_url" {
  type        = string
  description = "Git URL of the monorepo to mirror (read-only credentials, if any, are not kept)."
}

variable "repository_ref" {
  type        = string
  default     = "main"
  description = "Branch whose commit the mirror records."
}

variable "ami_name_prefix" {
  type        = string
  default     = "spotbuild"
  description = "AMI names are PREFIX-ARCH-YYYYMMDD-hhmmss."
}

variable "volume_gb" {
  type        = number
  default     = 40
  description = "Size of the images' root volume (launches grow it to [cloud] root_volume_gb)."
}

variable "tags" {
  type        = map(string)
  default     = {}
  description = "Tags for the AMIs and their snapshots."
}

# Canonical publishes each architecture's base image under its own parameter (amd64, arm64).
data "amazon-parameterstore" "base_ami_x86_64" {
  name   = var.base_ami_parameter_x86_64
  region = var.region
}

data "amazon-parameterstore" "base_ami_arm64" {
  name   = var.base_ami_parameter_arm64
  region = var.region
}

locals {
  # One stamp for the run: the images baked together share it.
  stamp = formatdate("YYYYMMDD-hhmmss", timestamp())
  # What differs between the architectures; the build-level sources below and the file
  # provisioner (by source.name, which is the architecture) read it.
  spotbuild_binary = {
    x86_64 = var.spotbuild_binary_x86_64
    arm64  = var.spotbuild_binary_arm64
  }
}

# What both images share. The architecture's own settings (base image, build instance
# type, name, tags) are filled in by the build's sources, one per architecture.
source "amazon-ebs" "spotbuild" {
  region                  = var.region
  subnet_id               = var.subnet_id
  ssh_username            = "ubuntu"
  temporary_key_pair_type = "ed25519"
  encrypt_boot            = true
  imds_support            = "v2.0"

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  launch_block_device_mappings {
    device_name           = "/dev/sda1"
    volume_size           = var.volume_gb
    volume_type           = "gp3"
    encrypted             = true
    delete_on_termination = true
  }
}

build {
  # Build names amazon-ebs.x86_64 and amazon-ebs.arm64 (what `-only=` selects).
  source "source.amazon-ebs.spotbuild" {
    name            = "x86_64"
    source_ami      = data.amazon-parameterstore.base_ami_x86_64.value
    instance_type   = var.instance_type_x86_64
    ami_name        = "${var.ami_name_prefix}-x86_64-${local.stamp}"
    ami_description = "spotbuild build instance, x86_64 (${var.repository_ref} mirrored)"
    tags            = merge(var.tags, { "spotbuild:ami" = "true", "spotbuild:arch" = "x86_64", "spotbuild:mirror-ref" = var.repository_ref })
    snapshot_tags   = merge(var.tags, { "spotbuild:arch" = "x86_64" })
  }

  source "source.amazon-ebs.spotbuild" {
    name            = "arm64"
    source_ami      = data.amazon-parameterstore.base_ami_arm64.value
    instance_type   = var.instance_type_arm64
    ami_name        = "${var.ami_name_prefix}-arm64-${local.stamp}"
    ami_description = "spotbuild build instance, arm64 (${var.repository_ref} mirrored)"
    tags            = merge(var.tags, { "spotbuild:ami" = "true", "spotbuild:arch" = "arm64", "spotbuild:mirror-ref" = var.repository_ref })
    snapshot_tags   = merge(var.tags, { "spotbuild:arch" = "arm64" })
  }

  provisioner "file" {
    source      = local.spotbuild_binary[source.name]
    destination = "/tmp/spotbuild"
  }

  provisioner "shell" {
    execute_command = "sudo -E sh -eu '{{ .Path }}'"
    environment_vars = [
      "SPOTBUILD_USER=spotbuild",
      "SPOTBUILD_ARCH=${source.name}",
      "REPOSITORY_URL=${var.repository_url}",
      "REPOSITORY_REF=${var.repository_ref}",
    ]
    scripts = [
      "${path.root}/scripts/install-docker.sh",
      "${path.root}/scripts/install-spotbuild.sh",
      "${path.root}/scripts/mirror.sh",
      "${path.root}/scripts/harden-ssh.sh",
      "${path.root}/scripts/check-user-data-tools.sh",
      "${path.root}/scripts/cleanup.sh",
    ]
  }

  # One entry per baked image. Both entries carry the shared source's name, so
  # custom_data.arch is what ami/publish.sh tells them apart by.
  post-processor "manifest" {
    output     = "${path.root}/packer-manifest.json"
    strip_path = true
    custom_data = {
      arch = source.name
    }
  }
}
