# spotbuild's AWS footprint: where instances launch (launch template, security group),
# what they may do (instance roles), what the controller in CI may do (controller.tf),
# where images go (ECR) and where costs and transport objects go (two S3 buckets). Least
# privilege throughout: launching needs spotbuild's tags, terminating needs them too.
#
# Two trust levels. A trusted build (protected branch, tag) reads and writes the project
# repositories NAME/<project>. An untrusted build (any pull request, a fork's above all)
# runs on instances with a role of its own that reads those and writes only its namespace
# NAME/<untrusted_prefix>/<project>; its controller role launches and ends only instances
# tagged spotbuild:trust = untrusted and writes only the ledger's untrusted part. No
# instance writes the ledger.

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}

data "aws_subnet" "first" {
  id = var.subnet_ids[0]
}

locals {
  account   = data.aws_caller_identity.current.account_id
  partition = data.aws_partition.current.partition
  ssm_mode  = var.transport == "ssm"
  registry  = "${local.account}.dkr.ecr.${var.region}.amazonaws.com"
  repo_arns = [for r in aws_ecr_repository.project : r.arn]
  # The untrusted builds' namespace: NAME/<untrusted_prefix>/<project>.
  untrusted_repo_arns = [for r in aws_ecr_repository.untrusted : r.arn]
  # The tag every launch carries (cloud::tags::BUILD_ID); policies key on it.
  build_tag = "spotbuild:build-id"
  # "trusted" or "untrusted" on everything a build launches (cloud::tags::TRUST): the
  # untrusted controller may launch only with "untrusted" and end only what carries it.
  trust_tag        = "spotbuild:trust"
  transport_bucket = var.transport_bucket_name != "" ? var.transport_bucket_name : "${var.ledger_bucket_name}-transport"
  tags             = merge(var.tags, { "spotbuild:managed-by" = "terraform" })
  # The architectures instances run on. An AMI boots on one architecture only, so each has
  # its own, in the SSM parameter PREFIX-<arch> that `make ami` publishes and that the
  # controller resolves at launch ([cloud.<arch>] ami).
  arches         = ["x86_64", "arm64"]
  ami_parameters = { for a in local.arches : a => "${var.ami_parameter_prefix}-${a}" }
}

# ---------------------------------------------------------------------------------------
# Encryption key for the bucket and the image repositories.

resource "aws_kms_key" "spotbuild" {
  description             = "${var.name}: ledger, transport objects and images"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.key.json
  tags                    = local.tags
}

data "aws_iam_policy_document" "key" {
  #checkov:skip=CKV_AWS_111:a key policy's resource "*" means this key only; the account administers it (AWS's default key policy)
  #checkov:skip=CKV_AWS_356:a key policy's resource "*" means this key only
  #checkov:skip=CKV_AWS_109:a key policy's resource "*" means this key only; the account administers it
  statement {
    sid       = "AccountAdministersTheKey"
    actions   = ["kms:*"]
    resources = ["*"]
    principals {
      type        = "AWS"
      identifiers = ["arn:${local.partition}:iam::${local.account}:root"]
    }
  }
  # CloudWatch Logs encrypts the reaper's log group (reaper.tf) with the key, and only
  # that log group: the encryption context names it. Its ARN is built from its name
  # because the log group itself needs the key first.
  dynamic "statement" {
    for_each = var.reaper_enabled ? [1] : []
    content {
      sid = "CloudWatchLogsEncryptsTheReaperLogOnly"
      actions = [
        "kms:Encrypt",
        "kms:Decrypt",
        "kms:ReEncryptFrom",
        "kms:ReEncryptTo",
        "kms:GenerateDataKey",
        "kms:GenerateDataKeyWithoutPlaintext",
        "kms:DescribeKey",
      ]
      resources = ["*"]
      principals {
        type        = "Service"
        identifiers = ["logs.${var.region}.amazonaws.com"]
      }
      condition {
        test     = "ArnEquals"
        variable = "kms:EncryptionContext:aws:logs:arn"
        values   = [local.reaper_log_group_arn]
      }
    }
  }
}

# ---------------------------------------------------------------------------------------
# Network: no inbound rule with SSM; SSH from the CI networks only otherwise.

resource "aws_security_group" "instances" {
  name_prefix = "${var.name}-instances-"
  description = "spotbuild build instances: ${var.transport} transport"
  vpc_id      = data.aws_subnet.first.vpc_id
  tags        = local.tags
  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "ssh" {
  for_each          = local.ssm_mode ? toset([]) : toset(var.ci_cidrs)
  security_group_id = aws_security_group.instances.id
  description       = "SSH from CI runners (${each.value})"
  ip_protocol       = "tcp"
  from_port         = 22
  to_port           = 22
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_egress_rule" "https" {
  security_group_id = aws_security_group.instances.id
  description       = "HTTPS out: ECR, S3, SSM, base images"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = "0.0.0.0/0"
}

# ---------------------------------------------------------------------------------------
# The instances' roles, one per trust level. Both may get an ECR token, write transport
# objects only under their own session's prefix (PREFIX/<role unique id>:<instance id>/,
# which is aws:userid for an instance role's session), use the key, and (SSM mode)
# register with SSM. The trusted role pulls and pushes the project repositories; the
# untrusted role pulls them and pushes only the untrusted namespace. Neither reaches the
# ledger.

data "aws_iam_policy_document" "ec2_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

# What both instance roles may do (each role's document pulls it in).
data "aws_iam_policy_document" "instance_common" {
  statement {
    sid       = "EcrToken"
    actions   = ["ecr:GetAuthorizationToken"]
    resources = ["*"] # GetAuthorizationToken has no resource-level permissions.
  }
  statement {
    # ${aws:userid} is IAM's policy variable (escaped so Terraform leaves it): "<role unique
    # id>:<instance id>" for an instance's credentials, so no instance writes another's
    # objects.
    sid       = "WriteOwnTransportObjectsOnly"
    actions   = ["s3:PutObject"]
    resources = ["${aws_s3_bucket.transport.arn}/${var.transport_prefix}/$${aws:userid}/*"]
  }
  statement {
    sid       = "EncryptWithTheKey"
    actions   = ["kms:GenerateDataKey", "kms:Decrypt"]
    resources = [aws_kms_key.spotbuild.arn]
  }
}

resource "aws_iam_role" "instance" {
  name_prefix        = "${var.name}-instance-"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
  tags               = local.tags
}

data "aws_iam_policy_document" "instance" {
  source_policy_documents = [data.aws_iam_policy_document.instance_common.json]
  statement {
    sid = "EcrPullPushProjectsOnly"
    actions = [
      "ecr:BatchCheckLayerAvailability",
      "ecr:BatchGetImage",
      "ecr:GetDownloadUrlForLayer",
      "ecr:DescribeImages",
      "ecr:InitiateLayerUpload",
      "ecr:UploadLayerPart",
      "ecr:CompleteLayerUpload",
      "ecr:PutImage",
    ]
    resources = local.repo_arns
  }
}

resource "aws_iam_role_policy" "instance" {
  name   = "spotbuild-instance"
  role   = aws_iam_role.instance.id
  policy = data.aws_iam_policy_document.instance.json
}

resource "aws_iam_role_policy_attachment" "ssm_core" {
  count      = local.ssm_mode ? 1 : 0
  role       = aws_iam_role.instance.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

resource "aws_iam_instance_profile" "instance" {
  name_prefix = "${var.name}-instance-"
  role        = aws_iam_role.instance.name
  tags        = local.tags
}

resource "aws_iam_role" "instance_untrusted" {
  name_prefix        = "${var.name}-untrusted-"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
  tags               = local.tags
}

data "aws_iam_policy_document" "instance_untrusted" {
  source_policy_documents = [data.aws_iam_policy_document.instance_common.json]
  statement {
    sid = "EcrPullProjects"
    actions = [
      "ecr:BatchCheckLayerAvailability",
      "ecr:BatchGetImage",
      "ecr:GetDownloadUrlForLayer",
      "ecr:DescribeImages",
    ]
    resources = local.repo_arns
  }
  statement {
    sid = "EcrPullPushUntrustedNamespaceOnly"
    actions = [
      "ecr:BatchCheckLayerAvailability",
      "ecr:BatchGetImage",
      "ecr:GetDownloadUrlForLayer",
      "ecr:DescribeImages",
      "ecr:InitiateLayerUpload",
      "ecr:UploadLayerPart",
      "ecr:CompleteLayerUpload",
      "ecr:PutImage",
    ]
    resources = local.untrusted_repo_arns
  }
  # AmazonSSMManagedInstanceCore allows ssm:GetParameter(s) on every parameter of the
  # account, SecureStrings under the aws/ssm key included; untrusted code reaches the
  # instance's credentials, and the agent reads no parameter (the controller resolves
  # the AMI).
  statement {
    sid    = "NoParameterReads"
    effect = "Deny"
    actions = [
      "ssm:GetParameter",
      "ssm:GetParameters",
      "ssm:GetParametersByPath",
      "ssm:GetParameterHistory",
    ]
    resources = ["*"]
  }
}

resource "aws_iam_role_policy" "instance_untrusted" {
  name   = "spotbuild-instance-untrusted"
  role   = aws_iam_role.instance_untrusted.id
  policy = data.aws_iam_policy_document.instance_untrusted.json
}

resource "aws_iam_role_policy_attachment" "ssm_core_untrusted" {
  count      = local.ssm_mode ? 1 : 0
  role       = aws_iam_role.instance_untrusted.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

resource "aws_iam_instance_profile" "instance_untrusted" {
  name_prefix = "${var.name}-untrusted-"
  role        = aws_iam_role.instance_untrusted.name
  tags        = local.tags
}

# ---------------------------------------------------------------------------------------
# The launch templates, one per architecture (each resolves its architecture's AMI):
# IMDSv2 only with hop limit 1 (containers cannot reach the instance's credentials), an
# encrypted gp3 root, and terminate on shutdown (the TTL's `shutdown -h` ends the instance
# for good). The controller creates a short-lived template per launch with these same
# settings, because each launch's user data carries its own host key; these are for
# anything else launched from the AMIs.

resource "aws_launch_template" "instances" {
  for_each                             = local.ami_parameters
  name_prefix                          = "${var.name}-${each.key}-"
  description                          = "spotbuild build instances (${each.key})"
  image_id                             = "resolve:ssm:${each.value}"
  instance_initiated_shutdown_behavior = "terminate"
  ebs_optimized                        = true
  vpc_security_group_ids               = [aws_security_group.instances.id]
  update_default_version               = true

  iam_instance_profile {
    arn = aws_iam_instance_profile.instance.arn
  }

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
    instance_metadata_tags      = "disabled"
  }

  block_device_mappings {
    device_name = "/dev/sda1"
    ebs {
      volume_type           = "gp3"
      volume_size           = var.root_volume_gb
      encrypted             = true
      kms_key_id            = aws_kms_key.spotbuild.arn
      delete_on_termination = true
    }
  }

  monitoring {
    enabled = true
  }

  tag_specifications {
    resource_type = "instance"
    tags          = local.tags
  }
  tag_specifications {
    resource_type = "volume"
    tags          = local.tags
  }
  tags = local.tags
}

# The single template of earlier versions was the x86_64 one: it is kept, not replaced.
moved {
  from = aws_launch_template.instances
  to   = aws_launch_template.instances["x86_64"]
}

# ---------------------------------------------------------------------------------------
# Image repositories: one per project, and one per project in the untrusted namespace.
#
# A project repository's tags are immutable except branch-*, stage-* and buildcache-*,
# which move on every build by design, and the deploy environments' tags (<env>,
# deployed-<env>), which move on every deploy: cache-<hash> tags (content hashes) and the test
# passes recorded on them (cache-<hash>-<job>) can never be rewritten, not even by a
# trusted build. Lifecycle: untagged manifests go after a few days, and every image
# counts toward the cap (any tag status), so test tags and branch tags cannot grow a
# repository without bound.

resource "aws_ecr_repository" "project" {
  #checkov:skip=CKV_AWS_51:IMMUTABLE_WITH_EXCLUSION: every tag is immutable but branch-*, stage-*, buildcache-* and the deploy environments' tags, which move by design; this check accepts only IMMUTABLE
  for_each             = toset(var.repositories)
  name                 = "${var.name}/${each.value}"
  image_tag_mutability = "IMMUTABLE_WITH_EXCLUSION"
  image_tag_mutability_exclusion_filter {
    filter      = "branch-*"
    filter_type = "WILDCARD"
  }
  image_tag_mutability_exclusion_filter {
    filter      = "stage-*"
    filter_type = "WILDCARD"
  }
  image_tag_mutability_exclusion_filter {
    filter      = "buildcache-*"
    filter_type = "WILDCARD"
  }
  # `spotbuild deploy` moves <env> and deployed-<env> on every deploy.
  dynamic "image_tag_mutability_exclusion_filter" {
    for_each = concat(["deployed-*"], var.deploy_environments)
    content {
      filter      = image_tag_mutability_exclusion_filter.value
      filter_type = "WILDCARD"
    }
  }
  image_scanning_configuration {
    scan_on_push = true
  }
  encryption_configuration {
    encryption_type = "KMS"
    kms_key         = aws_kms_key.spotbuild.arn
  }
  tags = local.tags
}

resource "aws_ecr_lifecycle_policy" "project" {
  for_each   = aws_ecr_repository.project
  repository = each.value.name
  policy = jsonencode({
    rules = [
      {
        rulePriority = 1
        description  = "Untagged images expire"
        selection = {
          tagStatus   = "untagged"
          countType   = "sinceImagePushed"
          countUnit   = "days"
          countNumber = var.untagged_image_days
        }
        action = { type = "expire" }
      },
      {
        rulePriority = 2
        description  = "Every image counts toward the cap, whatever its tags"
        selection = {
          tagStatus   = "any"
          countType   = "imageCountMoreThan"
          countNumber = var.keep_images
        }
        action = { type = "expire" }
      },
    ]
  })
}

# The untrusted namespace: what pull requests build. Only untrusted instances push here;
# trusted builds never read it. Everything in it expires untrusted_image_days after its
# push (a pull request's images are worth little after it merges or goes stale). ECR
# applies a count rule and an age rule to disjoint images only (an image selected by one
# rule's tags is never expired by a later rule), so the age is what bounds the tagged
# images here: at most untrusted_image_days of pushes.

resource "aws_ecr_repository" "untrusted" {
  #checkov:skip=CKV_AWS_51:a pull request's namespace is rewritten by each of its builds and nothing trusted reads it
  for_each             = toset(var.repositories)
  name                 = "${var.name}/${var.untrusted_prefix}/${each.value}"
  image_tag_mutability = "MUTABLE"
  image_scanning_configuration {
    scan_on_push = true
  }
  encryption_configuration {
    encryption_type = "KMS"
    kms_key         = aws_kms_key.spotbuild.arn
  }
  tags = local.tags
}

resource "aws_ecr_lifecycle_policy" "untrusted" {
  for_each   = aws_ecr_repository.untrusted
  repository = each.value.name
  policy = jsonencode({
    rules = [
      {
        rulePriority = 1
        description  = "Untagged images expire"
        selection = {
          tagStatus   = "untagged"
          countType   = "sinceImagePushed"
          countUnit   = "days"
          countNumber = var.untagged_image_days
        }
        action = { type = "expire" }
      },
      {
        rulePriority = 2
        description  = "Every image expires untrusted_image_days after its push"
        selection = {
          tagStatus   = "any"
          countType   = "sinceImagePushed"
          countUnit   = "days"
          countNumber = var.untrusted_image_days
        }
        action = { type = "expire" }
      },
    ]
  })
}

# ---------------------------------------------------------------------------------------
# The ledger bucket: the cost ledger (one object per build; untrusted builds' under
# LEDGER_PREFIX/untrusted/). Encrypted with the key, versioned, no public access, TLS
# only. Only the controllers and the reaper write it, never an instance.

resource "aws_s3_bucket" "spotbuild" {
  #checkov:skip=CKV_AWS_18:access logs would need a second bucket per install; CloudTrail data events are the recommended audit trail
  #checkov:skip=CKV_AWS_144:the ledger is rebuildable from CI history; cross-region replication is the operator's choice
  #checkov:skip=CKV2_AWS_62:nothing consumes bucket events; the controller polls its own prefixes
  bucket = var.ledger_bucket_name
  tags   = local.tags
}

resource "aws_s3_bucket_ownership_controls" "spotbuild" {
  bucket = aws_s3_bucket.spotbuild.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "spotbuild" {
  bucket                  = aws_s3_bucket.spotbuild.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_versioning" "spotbuild" {
  bucket = aws_s3_bucket.spotbuild.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "spotbuild" {
  bucket = aws_s3_bucket.spotbuild.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.spotbuild.arn
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "spotbuild" {
  bucket = aws_s3_bucket.spotbuild.id
  rule {
    # Heartbeat markers are tiny and matter only while their build runs; the reaper
    # reads them. Each beat rewrites the marker, so its old versions go after a day.
    id     = "heartbeat-markers-expire"
    status = "Enabled"
    filter {
      prefix = "${var.ledger_prefix}/live/"
    }
    expiration {
      days = 14
    }
    noncurrent_version_expiration {
      noncurrent_days = 1
    }
  }
  rule {
    # The same for untrusted builds, which beat in the ledger's untrusted part.
    id     = "untrusted-heartbeat-markers-expire"
    status = "Enabled"
    filter {
      prefix = "${var.ledger_prefix}/untrusted/live/"
    }
    expiration {
      days = 14
    }
    noncurrent_version_expiration {
      noncurrent_days = 1
    }
  }
  rule {
    # Builds' archived logs (`spotbuild logs`): kept as long as the team wants to look back.
    id     = "build-logs-expire"
    status = "Enabled"
    filter {
      prefix = "${var.ledger_prefix}/logs/"
    }
    expiration {
      days = var.log_retention_days
    }
    noncurrent_version_expiration {
      noncurrent_days = 1
    }
  }
  rule {
    id     = "untrusted-build-logs-expire"
    status = "Enabled"
    filter {
      prefix = "${var.ledger_prefix}/untrusted/logs/"
    }
    expiration {
      days = var.log_retention_days
    }
    noncurrent_version_expiration {
      noncurrent_days = 1
    }
  }
  rule {
    id     = "old-versions-and-uploads"
    status = "Enabled"
    filter {}
    noncurrent_version_expiration {
      noncurrent_days = 30
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }
  depends_on = [aws_s3_bucket_versioning.spotbuild]
}

data "aws_iam_policy_document" "bucket" {
  statement {
    sid       = "TlsOnly"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.spotbuild.arn, "${aws_s3_bucket.spotbuild.arn}/*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "spotbuild" {
  bucket     = aws_s3_bucket.spotbuild.id
  policy     = data.aws_iam_policy_document.bucket.json
  depends_on = [aws_s3_bucket_public_access_block.spotbuild]
}

# ---------------------------------------------------------------------------------------
# The transport bucket: SSM transport objects (a command's input, event chunks). An
# instance writes only under TRANSPORT_PREFIX/<role unique id>:<instance id>/ (its
# aws:userid); the controller puts each command's input there and reads the chunks.
# Encrypted with the key, no public access, TLS only, unversioned, and everything in it
# expires after transport_object_days.

resource "aws_s3_bucket" "transport" {
  #checkov:skip=CKV_AWS_18:access logs would need a second bucket per install; CloudTrail data events are the recommended audit trail
  #checkov:skip=CKV_AWS_144:transport objects live minutes and are deleted when their command ends; there is nothing to replicate
  #checkov:skip=CKV2_AWS_62:nothing consumes bucket events; the controller reads the objects of its own commands
  #checkov:skip=CKV_AWS_21:transport objects (a command's input, event chunks) live minutes and are deleted when their command ends; versions would keep them
  bucket = local.transport_bucket
  tags   = local.tags
}

resource "aws_s3_bucket_ownership_controls" "transport" {
  bucket = aws_s3_bucket.transport.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "transport" {
  bucket                  = aws_s3_bucket.transport.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_server_side_encryption_configuration" "transport" {
  bucket = aws_s3_bucket.transport.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.spotbuild.arn
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "transport" {
  bucket = aws_s3_bucket.transport.id
  rule {
    id     = "transport-objects-expire"
    status = "Enabled"
    filter {}
    expiration {
      days = var.transport_object_days
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }
}

data "aws_iam_policy_document" "transport_bucket" {
  statement {
    sid       = "TlsOnly"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.transport.arn, "${aws_s3_bucket.transport.arn}/*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "transport" {
  bucket     = aws_s3_bucket.transport.id
  policy     = data.aws_iam_policy_document.transport_bucket.json
  depends_on = [aws_s3_bucket_public_access_block.transport]
}
