# The reaper: `spotbuild reap` as a Lambda that EventBridge runs every few minutes, so a
# deployment has a sweep for leaked build instances without anyone running it. The zip
# holds one file, `bootstrap` (the spotbuild release binary, `make reaper-zip`); named so,
# the binary serves the Lambda Runtime API and runs one reap pass per invocation. A pass
# terminates tagged instances whose build stopped beating for the heartbeat window, ends
# their launch templates and spot requests, and marks their ledger entries abandoned.
#
# Least privilege: Describe (no resource-level permissions), teardown only of resources
# carrying spotbuild:build-id, the ledger prefix of the bucket, the key, its own log
# group. Nothing to launch with, no iam:PassRole. Every resource here exists only when
# reaper_enabled.

locals {
  reaper_count         = var.reaper_enabled ? 1 : 0
  reaper_name          = "${var.name}-reaper"
  reaper_log_group     = "/aws/lambda/${local.reaper_name}"
  reaper_log_group_arn = "arn:${local.partition}:logs:${var.region}:${local.account}:log-group:${local.reaper_log_group}"
}

data "aws_iam_policy_document" "lambda_assume" {
  count = local.reaper_count
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["lambda.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "reaper" {
  count              = local.reaper_count
  name_prefix        = "${var.name}-reaper-"
  assume_role_policy = data.aws_iam_policy_document.lambda_assume[0].json
  tags               = local.tags
}

data "aws_iam_policy_document" "reaper" {
  count = local.reaper_count
  statement {
    #checkov:skip=CKV_AWS_356:EC2 Describe* calls have no resource-level permissions
    sid = "Describe"
    actions = [
      "ec2:DescribeInstances",
      "ec2:DescribeLaunchTemplates",
      "ec2:DescribeSpotInstanceRequests",
    ]
    resources = ["*"]
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
    sid       = "ReadHeartbeatsAndMarkAbandonedBuilds"
    actions   = ["s3:GetObject", "s3:PutObject"]
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
    sid       = "EncryptWithTheKey"
    actions   = ["kms:GenerateDataKey", "kms:Decrypt"]
    resources = [aws_kms_key.spotbuild.arn]
  }
  statement {
    sid       = "WriteOwnLogGroupOnly"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = [aws_cloudwatch_log_group.reaper[0].arn, "${aws_cloudwatch_log_group.reaper[0].arn}:*"]
  }
}

resource "aws_iam_role_policy" "reaper" {
  count  = local.reaper_count
  name   = "spotbuild-reaper"
  role   = aws_iam_role.reaper[0].id
  policy = data.aws_iam_policy_document.reaper[0].json
}

# Created here so the role needs no logs:CreateLogGroup. A year of a few KB per pass is
# well under a GB; encrypted with the module's key (main.tf lets CloudWatch Logs use it
# for this log group only).
resource "aws_cloudwatch_log_group" "reaper" {
  count             = local.reaper_count
  name              = local.reaper_log_group
  retention_in_days = 365
  kms_key_id        = aws_kms_key.spotbuild.arn
  tags              = local.tags
}

resource "aws_lambda_function" "reaper" {
  #checkov:skip=CKV_AWS_116:a scheduled idempotent reap needs no dead-letter queue; the next scheduled pass retries whatever this one missed
  #checkov:skip=CKV_AWS_117:the reaper only calls AWS APIs (EC2, S3, KMS, Logs) and reaches no private resource; a VPC would add NAT or endpoints for nothing
  #checkov:skip=CKV_AWS_272:the zip is the spotbuild release binary built by make reaper-zip and pinned by source_code_hash; code signing needs a Signer profile and signed S3 artifacts
  count                          = local.reaper_count
  function_name                  = local.reaper_name
  description                    = "spotbuild reap on a schedule: ends leaked build instances"
  role                           = aws_iam_role.reaper[0].arn
  runtime                        = "provided.al2023"
  handler                        = "bootstrap"
  architectures                  = ["x86_64"]
  filename                       = var.reaper_zip
  source_code_hash               = filebase64sha256(var.reaper_zip)
  timeout                        = 120
  memory_size                    = 256
  reserved_concurrent_executions = 1 # two passes never overlap
  kms_key_arn                    = aws_kms_key.spotbuild.arn

  environment {
    variables = {
      SPOTBUILD_LEDGER                = "s3://${aws_s3_bucket.spotbuild.id}/${var.ledger_prefix}"
      SPOTBUILD_REAP_HEARTBEAT_WINDOW = var.reaper_heartbeat_window
      SPOTBUILD_LOG                   = "info"
    }
  }

  tracing_config {
    mode = "PassThrough"
  }

  tags = local.tags

  lifecycle {
    precondition {
      condition     = var.reaper_zip != ""
      error_message = "reaper_zip is empty: build the zip with `make reaper-zip` and set reaper_zip to its path (target/lambda/reaper.zip), or set reaper_enabled = false."
    }
  }

  depends_on = [aws_cloudwatch_log_group.reaper, aws_iam_role_policy.reaper]
}

# A failed or throttled pass is not retried: the next scheduled pass does the same work.
resource "aws_lambda_function_event_invoke_config" "reaper" {
  count                        = local.reaper_count
  function_name                = aws_lambda_function.reaper[0].function_name
  maximum_retry_attempts       = 0
  maximum_event_age_in_seconds = 300
}

resource "aws_cloudwatch_event_rule" "reaper" {
  count               = local.reaper_count
  name                = local.reaper_name
  description         = "Runs spotbuild reap (${var.reaper_schedule})"
  schedule_expression = var.reaper_schedule
  tags                = local.tags
}

resource "aws_cloudwatch_event_target" "reaper" {
  count     = local.reaper_count
  rule      = aws_cloudwatch_event_rule.reaper[0].name
  target_id = "spotbuild-reap"
  arn       = aws_lambda_function.reaper[0].arn
}

resource "aws_lambda_permission" "reaper" {
  count         = local.reaper_count
  statement_id  = "InvokedByTheReaperScheduleOnly"
  action        = "lambda:InvokeFunction"
  function_name = aws_lambda_function.reaper[0].function_name
  principal     = "events.amazonaws.com"
  source_arn    = aws_cloudwatch_event_rule.reaper[0].arn
}
