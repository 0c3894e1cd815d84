# What `spotbuild` in CI may do. Launching is allowed only when the request tags what it
# creates with spotbuild:build-id; terminating only what carries that tag; passing only
# the instance role; SSM commands only to instances with the tag.

locals {
  ec2_arn = "arn:${local.partition}:ec2:${var.region}:${local.account}"
}

data "aws_iam_policy_document" "controller" {
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
    sid       = "ResolveTheAmi"
    actions   = ["ssm:GetParameter", "ssm:GetParameters"]
    resources = ["arn:${local.partition}:ssm:${var.region}:${local.account}:parameter${var.ami_parameter}"]
  }
  statement {
    sid       = "EcrToken"
    actions   = ["ecr:GetAuthorizationToken"]
    resources = ["*"]
  }
  statement {
    sid       = "PlanReadsProjectRepositories"
    actions   = ["ecr:DescribeImages", "ecr:ListImages", "ecr:BatchGetImage", "ecr:BatchCheckLayerAvailability"]
    resources = local.repo_arns
  }
  statement {
    sid     = "LedgerAndTransportObjects"
    actions = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"]
    resources = [
      "${aws_s3_bucket.spotbuild.arn}/${var.ledger_prefix}/*",
      "${aws_s3_bucket.spotbuild.arn}/${var.transport_prefix}/*",
    ]
  }
  statement {
    sid       = "ListOnlyOwnPrefixes"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.spotbuild.arn]
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["${var.ledger_prefix}/*", "${var.transport_prefix}/*"]
    }
  }
  statement {
    sid       = "EncryptWithTheKey"
    actions   = ["kms:GenerateDataKey", "kms:Decrypt"]
    resources = [aws_kms_key.spotbuild.arn]
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
      #checkov:skip=CKV_AWS_356:GetCommandInvocation, ListCommands and CancelCommand have no resource-level permissions
      sid       = "FollowCommands"
      actions   = ["ssm:GetCommandInvocation", "ssm:ListCommands", "ssm:CancelCommand"]
      resources = ["*"]
    }
  }
}

resource "aws_iam_policy" "controller" {
  name_prefix = "${var.name}-controller-"
  description = "spotbuild controller (CI): tagged launches and teardown, ECR reads, ledger"
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
