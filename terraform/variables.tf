variable "region" {
  description = "The AWS region spotbuild rents instances in."
  type        = string
}

variable "name" {
  description = "Prefix for every resource this module creates."
  type        = string
  default     = "spotbuild"
}

variable "subnet_ids" {
  description = "Subnets instances launch in (every instance type is tried in every subnet). All in one VPC."
  type        = list(string)
  validation {
    condition     = length(var.subnet_ids) > 0
    error_message = "Give at least one subnet."
  }
}

variable "transport" {
  description = "How the controller reaches instances: \"ssm\" (no inbound port) or \"ssh\" (port 22 from ci_cidrs only)."
  type        = string
  default     = "ssm"
  validation {
    condition     = contains(["ssm", "ssh"], var.transport)
    error_message = "transport is \"ssm\" or \"ssh\"."
  }
}

variable "ci_cidrs" {
  description = "Networks the CI runners connect from (SSH transport only)."
  type        = list(string)
  default     = []
  validation {
    condition     = alltrue([for c in var.ci_cidrs : can(cidrnetmask(c)) && c != "0.0.0.0/0"])
    error_message = "ci_cidrs are IPv4 CIDRs, never 0.0.0.0/0."
  }
}

variable "repositories" {
  description = "The monorepo's project names: one ECR repository each (the projects of build_manifest.json)."
  type        = list(string)
}

variable "ledger_bucket_name" {
  description = "Name of the S3 bucket for the cost ledger (created here)."
  type        = string
}

variable "ledger_prefix" {
  description = "Key prefix of the cost ledger in the bucket."
  type        = string
  default     = "ledger"
}

variable "transport_prefix" {
  description = "Key prefix of SSM transport objects (commands' input, event chunks) in the transport bucket. Each instance writes only under PREFIX/<its role's unique id>:<instance id>/."
  type        = string
  default     = "ssm"
}

variable "transport_bucket_name" {
  description = "Name of the S3 bucket for SSM transport objects (created here, unversioned). Empty: \"<ledger_bucket_name>-transport\"."
  type        = string
  default     = ""
}

variable "ami_parameter_prefix" {
  description = "Each architecture's instances launch from the AMI in the SSM parameter PREFIX-<arch> (PREFIX-x86_64, PREFIX-arm64), which `make ami` writes (its AMI_PARAMETER_PREFIX)."
  type        = string
  default     = "/spotbuild/ami/latest"
  validation {
    # The policy's parameter ARNs are "...:parameter" followed by the name, which must
    # start with a slash to make one.
    condition     = can(regex("^/[A-Za-z0-9_./-]+$", var.ami_parameter_prefix)) && !endswith(var.ami_parameter_prefix, "/")
    error_message = "ami_parameter_prefix is an SSM parameter path: it starts with /, does not end with /, and holds only letters, digits, _ . - and /."
  }
}

variable "root_volume_gb" {
  description = "Size of each instance's encrypted gp3 root volume."
  type        = number
  default     = 200
}

variable "keep_images" {
  description = "Images each ECR repository keeps (every tag counts, not only cache-); the oldest beyond this expire."
  type        = number
  default     = 500
}

variable "untagged_image_days" {
  description = "Days after which untagged images (superseded layers' manifests) expire."
  type        = number
  default     = 3
}

variable "log_retention_days" {
  description = "Days builds' archived logs (logs/ under the ledger prefix, `spotbuild logs`) are kept."
  type        = number
  default     = 90
  validation {
    condition     = var.log_retention_days >= 1 && floor(var.log_retention_days) == var.log_retention_days
    error_message = "log_retention_days is a whole number of days, at least 1."
  }
}

variable "transport_object_days" {
  description = "Days SSM transport objects may live (the controller deletes them when their command ends; this catches a killed controller)."
  type        = number
  default     = 1
  validation {
    condition     = var.transport_object_days >= 1 && floor(var.transport_object_days) == var.transport_object_days
    error_message = "transport_object_days is a whole number of days, at least 1."
  }
}

variable "controller_principals" {
  description = "IAM principal ARNs (CI roles of trusted jobs: protected branches, tags) allowed to assume the controller role. Empty: attach the controller policy yourself."
  type        = list(string)
  default     = []
}

variable "untrusted_controller_principals" {
  description = "IAM principal ARNs (CI roles of pull-request jobs) allowed to assume the untrusted controller role, which launches only untrusted instances and writes only the ledger's untrusted part. Empty: attach the untrusted controller policy yourself."
  type        = list(string)
  default     = []
}

variable "trusted_branches" {
  description = "[trust] trusted_branches: branches whose builds are trusted (globs: * matches within a path component, ** across). Pull requests are never trusted."
  type        = list(string)
  default     = ["main", "master"]
}

variable "untrusted_prefix" {
  description = "Untrusted builds (pull requests) write only the repositories NAME/<this>/<project>."
  type        = string
  default     = "pr"
  validation {
    condition     = can(regex("^[a-z0-9]+(?:[._-][a-z0-9]+)*$", var.untrusted_prefix))
    error_message = "untrusted_prefix is one lowercase repository path component: letters, digits, and single . _ - between them."
  }
}

variable "untrusted_image_days" {
  description = "Days after which images in the untrusted repositories expire (counted from their push)."
  type        = number
  default     = 14
  validation {
    condition     = var.untrusted_image_days >= 1 && floor(var.untrusted_image_days) == var.untrusted_image_days
    error_message = "untrusted_image_days is a whole number of days, at least 1."
  }
}

variable "tags" {
  description = "Cost-allocation tags for every resource (and, through spotbuild.toml, every instance)."
  type        = map(string)
  default     = {}
}

variable "reaper_enabled" {
  description = "Run `spotbuild reap` as a scheduled Lambda (reaper.tf), so leaked build instances end without anyone running it."
  type        = bool
  default     = true
}

variable "reaper_zip" {
  description = "Path to the reaper's deployment zip (one file, `bootstrap`: the spotbuild release binary); `make reaper-zip` writes target/lambda/reaper.zip. Required when reaper_enabled."
  type        = string
  default     = ""
}

variable "reaper_schedule" {
  description = "How often the reaper runs: an EventBridge schedule expression."
  type        = string
  default     = "rate(5 minutes)"
  validation {
    condition     = can(regex("^(rate|cron)\\(.+\\)$", var.reaper_schedule))
    error_message = "reaper_schedule is an EventBridge schedule expression: rate(...) or cron(...)."
  }
}

variable "reaper_heartbeat_window" {
  description = "The reaper terminates an instance whose build has not written a heartbeat for this long (SPOTBUILD_REAP_HEARTBEAT_WINDOW)."
  type        = string
  default     = "10m"
  validation {
    condition     = can(regex("^[1-9][0-9]*(s|m|h)$", var.reaper_heartbeat_window))
    error_message = "reaper_heartbeat_window is a positive whole number of s, m or h, like \"10m\"."
  }
}

variable "deploy_environments" {
  description = "Environments `spotbuild deploy --env` promotes to within the project repositories: their <env> tags (and every deployed-<env>) stay mutable there."
  type        = list(string)
  default     = ["staging", "production"]
  validation {
    condition     = alltrue([for e in var.deploy_environments : can(regex("^[a-z][a-z0-9_.-]{0,39}$", e)) && !startswith(e, "cache-") && !startswith(e, "deployed-")])
    error_message = "An environment is 1-40 characters of a-z, 0-9, _ . - starting with a letter, and not cache-* or deployed-* (spotbuild deploy checks the same)."
  }
}
