# The spotbuild build instance image: Docker with buildx and a BuildKit builder, the
# spotbuild binary (the agent), a git mirror of the monorepo whose commit is recorded (so
# only what it lacks is shipped), hardened sshd, and the tools the launch's user data
# uses (cloud-init, shutdown, ssh-keygen). Build it with `make ami` (see ami/README.md).

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
  description = "Region to bake in (the AMI is used there)."
}

variable "subnet_id" {
  type        = string
  default     = null
  description = "Subnet for the temporary build instance [default: the default VPC's]."
}

variable "instance_type" {
  type        = string
  default     = "m7a.2xlarge"
  description = "The temporary build instance's type."
}

variable "base_ami_parameter" {
  type        = string
  default     = "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id"
  description = "SSM parameter naming the base image (Ubuntu 24.04 LTS, amd64)."
}

variable "spotbuild_binary" {
  type        = string
  description = "Path to a Linux x86_64 release build of spotbuild (target/release/spotbuild)."
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
  description = "AMI names are PREFIX-YYYYMMDD-hhmmss."
}

variable "volume_gb" {
  type        = number
  default     = 40
  description = "Size of the image's root volume (launches grow it to [cloud] root_volume_gb)."
}

variable "tags" {
  type        = map(string)
  default     = {}
  description = "Tags for the AMI and its snapshot."
}

data "amazon-parameterstore" "base_ami" {
  name   = var.base_ami_parameter
  region = var.region
}

locals {
  ami_name = "${var.ami_name_prefix}-${formatdate("YYYYMMDD-hhmmss", timestamp())}"
}

source "amazon-ebs" "spotbuild" {
  region                  = var.region
  source_ami              = data.amazon-parameterstore.base_ami.value
  instance_type           = var.instance_type
  subnet_id               = var.subnet_id
  ssh_username            = "ubuntu"
  temporary_key_pair_type = "ed25519"
  ami_name                = local.ami_name
  ami_description         = "spotbuild build instance (${var.repository_ref} mirrored)"
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

  tags          = merge(var.tags, { "spotbuild:ami" = "true", "spotbuild:mirror-ref" = var.repository_ref })
  snapshot_tags = var.tags
}

build {
  sources = ["source.amazon-ebs.spotbuild"]

  provisioner "file" {
    source      = var.spotbuild_binary
    destination = "/tmp/spotbuild"
  }

  provisioner "shell" {
    execute_command = "sudo -E sh -eu '{{ .Path }}'"
    environment_vars = [
      "SPOTBUILD_USER=spotbuild",
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

  post-processor "manifest" {
    output     = "${path.root}/packer-manifest.json"
    strip_path = true
  }
}
