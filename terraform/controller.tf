# What `spotbuild` in CI may do, at two trust levels. Launching is allowed only when the
# request tags what it creates with spotbuild:build-id; terminating only what carries that
# tag; passing only an instance role; SSM commands only to instances with the tag.
#
# The controller (trusted jobs: protected branches, tags) passes the trusted instance role
# and writes the whole ledger. The untrusted controller (pull-request jobs) launches only
# with spotbuild:trust = untrusted in the request, ends and commands only instances
# carrying it, passes only the untrusted instance role, and writes only the ledger's
# untrusted part and the transport objects of untrusted instances. What both may do is in
# controller_common, which each document pulls in.

locals {
  ec2_arn = "arn:${local.partition}:ec2:${var.region}:${local.account}"
}

data "aws_iam_policy_document" "controller_common" {
  statement {
    sid     = "LaunchFromTheseResources"
    actions = ["ec2:RunInstances", "ec2:CreateFleet"]
    resources = concat(
      ["arn:${local.partition}:ec2:${var.region}::image/*"],
      [for s in var.subnet_ids : "${local.ec2_arn}:subnet/${s}"],
      [aws_security_group.instances.arn],
      ["${local.ec2_arn}:network-interface/*"],
    )
  }
  statement {
    sid       = "TagOnlyWhileCreating"
    actions   = ["ec2:CreateTags"]
    resources = ["${local.ec2_arn}:*/*"]
    condition {
      test     = "StringEquals"
      variable = "ec2:CreateAction"
      values   = ["CreateFleet", "RunInstances", "CreateLaunchTemplate"]
    }
  }
  statement {
    #checkov:skip=CKV_AWS_356:EC2 Describe* calls have no resource-level permissions
    sid = "Describe"
    actions = [
      "ec2:DescribeInstances",
      "ec2:DescribeSpotPriceHistory",
      "ec2:DescribeSpotInstanceRequests",
      "ec2:DescribeImages",
      "ec2:DescribeSubnets",
      "ec2:DescribeLaunchTemplates",
      "ec2:DescribeFleets",
      "ec2:DescribeInstanceTypes",
    ]
    resources = ["*"]
  }
  statement {
    # Each architecture's AMI parameter (local.ami_parameters), and no other parameter.
    sid     = "ResolveTheAmi"
    actions = ["ssm:GetParameter", "ssm:GetParameters"]
    resources = [
      "arn:${local.partition}:ssm:${var.region}:${local.account}:parameter${local.ami_parameters.x86_64}",
      "arn:${local.partition}:ssm:${var.region}:${local.account}:parameter${local.ami_parameters.arm64}",
    ]
  }
  statement {
    sid       = "EcrToken"
    actions   = ["ecr:GetAuthorizationToken"]
    resources = ["*"]
  }
  statement {
    # The plan reads both: an untrusted build takes what the trusted cache has, then its
    # own namespace; a trusted plan may show what a pull request built.
    sid       = "PlanReadsProjectRepositories"
    actions   = ["ecr:DescribeImages", "ecr:ListImages", "ecr:BatchGetImage", "ecr:BatchCheckLayerAvailability"]
    resources = concat(local.repo_arns, local.untrusted_repo_arns)
  }
  statement {
    sid       = "EncryptWithTheKey"
    actions   = ["kms:GenerateDataKey", "kms:Decrypt"]
    resources = [aws_kms_key.spotbuild.arn]
  }
  dynamic "statement" {
    for_each = local.ssm_mode ? [1] : []
    content {
      sid       = "OnlyTheShellDocument"
      actions   = ["ssm:SendCommand"]
      resources = ["arn:${local.partition}:ssm:${var.region}::document/AWS-RunShellScript"]
    }
  }
  dynamic "statement" {
    for_each = local.ssm_mode ? [1] : []
    content {
      #checkov:skip=CKV_AWS_356:GetCommandInvocation and CancelCommand have no resource-level permissions
      # Not ListCommands: it returns commands' parameters (a presigned URL to a job), and
      # the untrusted controller shares this statement.
      sid       = "FollowCommands"
      actions   = ["ssm:GetCommandInvocation", "ssm:CancelCommand"]
      resources = ["*"]
    }
  }
}

# ---------------------------------------------------------------------------------------
# The controller: trusted builds.

data "aws_iam_policy_document" "controller" {
  source_policy_documents = [data.aws_iam_policy_document.controller_common.json]
  statement {
    sid     = "LaunchOnlyWithSpotbuildTags"
    actions = ["ec2:CreateFleet", "ec2:RunInstances", "ec2:CreateLaunchTemplate"]
    resources = [
      "${local.ec2_arn}:instance/*",
      "${local.ec2_arn}:volume/*",
      "${local.ec2_arn}:fleet/*",
      "${local.ec2_arn}:launch-template/*",
      "${local.ec2_arn}:spot-instances-request/*",
    ]
    condition {
      test     = "Null"
      variable = "aws:RequestTag/${local.build_tag}"
      values   = ["false"]
    }
  }
  statement {
    sid       = "LaunchFromOwnTemplatesOnly"
    actions   = ["ec2:RunInstances", "ec2:CreateFleet"]
    resources = ["${local.ec2_arn}:launch-template/*"]
    condition {
      test     = "Null"
      variable = "ec2:ResourceTag/${local.build_tag}"
      values   = ["false"]
    }
  }
  statement {
    sid     = "EndOnlyTaggedResources"
    actions = ["ec2:TerminateInstances", "ec2:DeleteLaunchTemplate", "ec2:CancelSpotInstanceRequests"]
    resources = [
      "${local.ec2_arn}:instance/*",
      "${local.ec2_arn}:launch-template/*",
      "${local.ec2_arn}:spot-instances-request/*",
    ]
    condition {
      test     = "Null"
      variable = "ec2:ResourceTag/${local.build_tag}"
      values   = ["false"]
    }
  }
  statement {
    sid       = "PassOnlyTheInstanceRole"
    actions   = ["iam:PassRole"]
    resources = [aws_iam_role.instance.arn]
    condition {
      test     = "StringEquals"
      variable = "iam:PassedToService"
      values   = ["ec2.amazonaws.com"]
    }
  }
  statement {
    sid       = "LedgerObjects"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"]
    resources = ["${aws_s3_bucket.spotbuild.arn}/${var.ledger_prefix}/*"]
  }
  # Unconditioned: S3 answers a GET of a missing key with 404 only to a principal
  # that may list the bucket without a prefix condition (403 otherwise), and a
  # missing key is an answer here (no heartbeat yet, no chunk yet). Key names hold
  # no secrets; reading and writing stay limited to the prefixes above.
  statement {
    sid       = "ListTheLedgerBucket"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.spotbuild.arn]
  }
  statement {
    sid       = "TransportObjects"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"]
    resources = ["${aws_s3_bucket.transport.arn}/${var.transport_prefix}/*"]
  }
  # Unconditioned: S3 answers a GET of a missing key with 404 only to a principal
  # that may list the bucket without a prefix condition (403 otherwise), and a
  # missing key is an answer here (no heartbeat yet, no chunk yet). Key names hold
  # no secrets; reading and writing stay limited to the prefixes above.
  statement {
    sid       = "ListTheTransportBucket"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.transport.arn]
  }
  dynamic "statement" {
    for_each = local.ssm_mode ? [1] : []
    content {
      sid       = "CommandsOnlyToTaggedInstances"
      actions   = ["ssm:SendCommand"]
      resources = ["${local.ec2_arn}:instance/*"]
      condition {
        test     = "Null"
        variable = "ssm:resourceTag/${local.build_tag}"
        values   = ["false"]
      }
    }
  }
}

resource "aws_iam_policy" "controller" {
  name_prefix = "${var.name}-controller-"
  description = "spotbuild controller (CI, trusted builds): tagged launches and teardown, ECR reads, ledger"
  policy      = data.aws_iam_policy_document.controller.json
  tags        = local.tags
}

data "aws_iam_policy_document" "controller_assume" {
  count = length(var.controller_principals) > 0 ? 1 : 0
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "AWS"
      identifiers = var.controller_principals
    }
  }
}

resource "aws_iam_role" "controller" {
  count              = length(var.controller_principals) > 0 ? 1 : 0
  name_prefix        = "${var.name}-controller-"
  assume_role_policy = data.aws_iam_policy_document.controller_assume[0].json
  tags               = local.tags
}

resource "aws_iam_role_policy_attachment" "controller" {
  count      = length(var.controller_principals) > 0 ? 1 : 0
  role       = aws_iam_role.controller[0].name
  policy_arn = aws_iam_policy.controller.arn
}

# ---------------------------------------------------------------------------------------
# The untrusted controller: pull requests. It differs where it must: the trust tag on
# launches, teardown and commands, the role it passes, the ledger's untrusted part, and
# only the untrusted instances' transport objects (so a pull request's job can neither
# read a trusted build's events nor rewrite a trusted command's input).

data "aws_iam_policy_document" "controller_untrusted" {
  source_policy_documents = [data.aws_iam_policy_document.controller_common.json]
  statement {
    sid     = "LaunchOnlyUntrustedWithSpotbuildTags"
    actions = ["ec2:CreateFleet", "ec2:RunInstances", "ec2:CreateLaunchTemplate"]
    resources = [
      "${local.ec2_arn}:instance/*",
      "${local.ec2_arn}:volume/*",
      "${local.ec2_arn}:fleet/*",
      "${local.ec2_arn}:launch-template/*",
      "${local.ec2_arn}:spot-instances-request/*",
    ]
    condition {
      test     = "Null"
      variable = "aws:RequestTag/${local.build_tag}"
      values   = ["false"]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:RequestTag/${local.trust_tag}"
      values   = ["untrusted"]
    }
  }
  statement {
    sid       = "LaunchFromOwnUntrustedTemplatesOnly"
    actions   = ["ec2:RunInstances", "ec2:CreateFleet"]
    resources = ["${local.ec2_arn}:launch-template/*"]
    condition {
      test     = "Null"
      variable = "ec2:ResourceTag/${local.build_tag}"
      values   = ["false"]
    }
    condition {
      test     = "StringEquals"
      variable = "ec2:ResourceTag/${local.trust_tag}"
      values   = ["untrusted"]
    }
  }
  statement {
    sid     = "EndOnlyUntrustedResources"
    actions = ["ec2:TerminateInstances", "ec2:DeleteLaunchTemplate", "ec2:CancelSpotInstanceRequests"]
    resources = [
      "${local.ec2_arn}:instance/*",
      "${local.ec2_arn}:launch-template/*",
      "${local.ec2_arn}:spot-instances-request/*",
    ]
    condition {
      test     = "Null"
      variable = "ec2:ResourceTag/${local.build_tag}"
      values   = ["false"]
    }
    condition {
      test     = "StringEquals"
      variable = "ec2:ResourceTag/${local.trust_tag}"
      values   = ["untrusted"]
    }
  }
  statement {
    sid       = "PassOnlyTheUntrustedInstanceRole"
    actions   = ["iam:PassRole"]
    resources = [aws_iam_role.instance_untrusted.arn]
    condition {
      test     = "StringEquals"
      variable = "iam:PassedToService"
      values   = ["ec2.amazonaws.com"]
    }
  }
  statement {
    sid       = "UntrustedLedgerObjectsOnly"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"]
    resources = ["${aws_s3_bucket.spotbuild.arn}/${var.ledger_prefix}/untrusted/*"]
  }
  # Unconditioned: S3 answers a GET of a missing key with 404 only to a principal
  # that may list the bucket without a prefix condition (403 otherwise), and a
  # missing key is an answer here (no heartbeat yet, no chunk yet). Key names hold
  # no secrets; reading and writing stay limited to the prefixes above.
  statement {
    sid       = "ListTheLedgerBucketNames"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.spotbuild.arn]
  }
  statement {
    # An untrusted instance's objects are under PREFIX/<its role's unique id>:<instance id>/.
    sid       = "UntrustedTransportObjectsOnly"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"]
    resources = ["${aws_s3_bucket.transport.arn}/${var.transport_prefix}/${aws_iam_role.instance_untrusted.unique_id}:*"]
  }
  # Unconditioned: S3 answers a GET of a missing key with 404 only to a principal
  # that may list the bucket without a prefix condition (403 otherwise), and a
  # missing key is an answer here (no heartbeat yet, no chunk yet). Key names hold
  # no secrets; reading and writing stay limited to the prefixes above.
  statement {
    sid       = "ListTheTransportBucketNames"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.transport.arn]
  }
  dynamic "statement" {
    for_each = local.ssm_mode ? [1] : []
    content {
      sid       = "CommandsOnlyToUntrustedInstances"
      actions   = ["ssm:SendCommand"]
      resources = ["${local.ec2_arn}:instance/*"]
      condition {
        test     = "Null"
        variable = "ssm:resourceTag/${local.build_tag}"
        values   = ["false"]
      }
      condition {
        test     = "StringEquals"
        variable = "ssm:resourceTag/${local.trust_tag}"
        values   = ["untrusted"]
      }
    }
  }
}

resource "aws_iam_policy" "controller_untrusted" {
  name_prefix = "${var.name}-controller-untrusted-"
  description = "spotbuild controller (CI, pull requests): untrusted launches and teardown, ECR reads, the ledger's untrusted part"
  policy      = data.aws_iam_policy_document.controller_untrusted.json
  tags        = local.tags
}

data "aws_iam_policy_document" "controller_untrusted_assume" {
  count = length(var.untrusted_controller_principals) > 0 ? 1 : 0
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "AWS"
      identifiers = var.untrusted_controller_principals
    }
  }
}

resource "aws_iam_role" "controller_untrusted" {
  count              = length(var.untrusted_controller_principals) > 0 ? 1 : 0
  name_prefix        = "${var.name}-controller-untrusted-"
  assume_role_policy = data.aws_iam_policy_document.controller_untrusted_assume[0].json
  tags               = local.tags
}

resource "aws_iam_role_policy_attachment" "controller_untrusted" {
  count      = length(var.untrusted_controller_principals) > 0 ? 1 : 0
  role       = aws_iam_role.controller_untrusted[0].name
  policy_arn = aws_iam_policy.controller_untrusted.arn
}

# ---------------------------------------------------------------------------------------
# The deployer: `spotbuild deploy` within the project repositories (a promotion to another
# registry needs push rights there instead). It reads the cache and test tags, pushes the
# commit, release and environment tags (a manifest copy: no layer moves within one
# registry), and records each deploy in the ledger. ECR cannot limit a push by tag;
# immutability keeps cache-* and the commit tags from being rewritten.

data "aws_iam_policy_document" "deployer" {
  statement {
    sid       = "EcrToken"
    actions   = ["ecr:GetAuthorizationToken"]
    resources = ["*"]
  }
  statement {
    sid = "EcrPromoteWithinProjectRepositories"
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
    sid       = "DeployRecordsOnly"
    actions   = ["s3:PutObject"]
    resources = ["${aws_s3_bucket.spotbuild.arn}/${var.ledger_prefix}/deploys/*"]
  }
  statement {
    sid       = "EncryptWithTheKey"
    actions   = ["kms:GenerateDataKey", "kms:Decrypt"]
    resources = [aws_kms_key.spotbuild.arn]
  }
}

resource "aws_iam_policy" "deployer" {
  name_prefix = "${var.name}-deployer-"
  description = "spotbuild deploy (CD, trusted refs only): promote images within the project repositories, record deploys"
  policy      = data.aws_iam_policy_document.deployer.json
  tags        = local.tags
}
