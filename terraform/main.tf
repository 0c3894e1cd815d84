# spotbuild's AWS footprint: where instances launch (launch template, security group),
# what they may do (instance role), what the controller in CI may do (controller policy),
# where images go (ECR) and where costs and transport objects go (S3). Least privilege
# throughout: launching needs spotbuild's tags, terminating needs them too.

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
  # The tag every launch carries (cloud::tags::BUILD_ID); policies key on it.
  build_tag = "spotbuild:build-id"
  tags      = merge(var.tags, { "spotbuild:managed-by" = "terraform" })
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
# The instances' role: push and pull the project repositories, write transport objects
# and ledger entries under their prefixes, and (SSM mode) register with SSM.

data "aws_iam_policy_document" "ec2_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "instance" {
  name_prefix        = "${var.name}-instance-"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
  tags               = local.tags
}

data "aws_iam_policy_document" "instance" {
  statement {
    sid       = "EcrToken"
    actions   = ["ecr:GetAuthorizationToken"]
    resources = ["*"] # GetAuthorizationToken has no resource-level permissions.
  }
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
  statement {
    sid     = "WriteLedgerAndTransportPrefixesOnly"
    actions = ["s3:PutObject"]
    resources = [
      "${aws_s3_bucket.spotbuild.arn}/${var.ledger_prefix}/*",
      "${aws_s3_bucket.spotbuild.arn}/${var.transport_prefix}/*",
    ]
  }
  statement {
    sid       = "EncryptWithTheKey"
    actions   = ["kms:GenerateDataKey", "kms:Decrypt"]
    resources = [aws_kms_key.spotbuild.arn]
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

# ---------------------------------------------------------------------------------------
# The launch template: IMDSv2 only with hop limit 1 (containers cannot reach the
# instance's credentials), an encrypted gp3 root, and terminate on shutdown (the TTL's
# `shutdown -h` ends the instance for good). The controller creates a short-lived
# template per launch with these same settings, because each launch's user data carries
# its own host key; this one is for anything else launched from the AMI.

resource "aws_launch_template" "instances" {
  name_prefix                          = "${var.name}-"
  description                          = "spotbuild build instances"
  image_id                             = "resolve:ssm:${var.ami_parameter}"
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

# ---------------------------------------------------------------------------------------
# Image repositories: one per project. Tags are mutable because branch-<name> tags move;
# cache-<hash> tags are content-addressed and never rewritten. Lifecycle: untagged
# manifests go after a few days, and every image counts toward the cap (any tag status),
# so test tags and branch tags cannot grow a repository without bound.

resource "aws_ecr_repository" "project" {
  #checkov:skip=CKV_AWS_51:branch-<name> tags move on every build by design; cache- tags are content hashes and never rewritten
  for_each             = toset(var.repositories)
  name                 = "${var.name}/${each.value}"
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

# ---------------------------------------------------------------------------------------
# The bucket: the cost ledger (one object per build), SSM transport objects. Encrypted
# with the key, versioned, no public access, TLS only, and transport objects expire.

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
    id     = "transport-objects-expire"
    status = "Enabled"
    filter {
      prefix = "${var.transport_prefix}/"
    }
    expiration {
      days = var.transport_object_days
    }
    noncurrent_version_expiration {
      noncurrent_days = 1
    }
  }
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
