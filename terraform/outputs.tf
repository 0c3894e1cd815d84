# One output per spotbuild.toml key, and the file itself.

output "region" {
  description = "[cloud] region"
  value       = var.region
}

output "subnets" {
  description = "[cloud] subnets"
  value       = var.subnet_ids
}

output "ami" {
  description = "[cloud.<arch>] ami, per architecture: the SSM parameters `make ami` updates"
  value       = local.ami_parameters
}

output "instance_profile" {
  description = "[cloud] instance_profile"
  value       = aws_iam_instance_profile.instance.name
}

output "untrusted_instance_profile" {
  description = "[cloud] untrusted_instance_profile (pushes only to the untrusted namespace)"
  value       = aws_iam_instance_profile.instance_untrusted.name
}

output "security_groups" {
  description = "[cloud] security_groups"
  value       = [aws_security_group.instances.id]
}

output "root_volume_gb" {
  description = "[cloud] root_volume_gb"
  value       = var.root_volume_gb
}

output "registry" {
  description = "[registry] url"
  value       = "${local.registry}/${var.name}"
}

output "transport" {
  description = "[remote] transport"
  value       = var.transport
}

output "transport_bucket" {
  description = "[remote.ssm] bucket"
  value       = aws_s3_bucket.transport.id
}

output "transport_prefix" {
  description = "[remote.ssm] prefix"
  value       = var.transport_prefix
}

output "instance_role_id" {
  description = "[remote.ssm] role_id: the trusted instance role's unique id (an instance writes transport objects only under PREFIX/<this>:<instance id>/)"
  value       = aws_iam_role.instance.unique_id
}

output "untrusted_instance_role_id" {
  description = "[remote.ssm] untrusted_role_id: the same for the untrusted instance role"
  value       = aws_iam_role.instance_untrusted.unique_id
}

output "trusted_branches" {
  description = "[trust] trusted_branches"
  value       = var.trusted_branches
}

output "untrusted_prefix" {
  description = "[trust] untrusted_prefix"
  value       = var.untrusted_prefix
}

output "ledger" {
  description = "[ledger] url"
  value       = "s3://${aws_s3_bucket.spotbuild.id}/${var.ledger_prefix}"
}

output "launch_template_id" {
  description = "Per architecture, the launch template with the instances' settings (IMDSv2, encrypted gp3, terminate on shutdown)"
  value       = { for arch, t in aws_launch_template.instances : arch => t.id }
}

output "controller_policy_arn" {
  description = "Attach to the CI role that runs spotbuild for trusted builds (protected branches, tags)"
  value       = aws_iam_policy.controller.arn
}

output "deployer_policy_arn" {
  description = "Attach to the CD role that runs `spotbuild deploy` on trusted refs"
  value       = aws_iam_policy.deployer.arn
}

output "controller_role_arn" {
  description = "The controller role, when controller_principals was given"
  value       = length(aws_iam_role.controller) > 0 ? aws_iam_role.controller[0].arn : null
}

output "controller_untrusted_policy_arn" {
  description = "Attach to the CI role that runs spotbuild for pull requests"
  value       = aws_iam_policy.controller_untrusted.arn
}

output "controller_untrusted_role" {
  description = "The untrusted controller role (pull-request jobs), when untrusted_controller_principals was given"
  value       = length(aws_iam_role.controller_untrusted) > 0 ? aws_iam_role.controller_untrusted[0].arn : null
}

output "reaper_function" {
  description = "The reaper Lambda that runs `spotbuild reap` on a schedule (null when reaper_enabled is false)"
  value       = length(aws_lambda_function.reaper) > 0 ? aws_lambda_function.reaper[0].function_name : null
}

output "spotbuild_toml" {
  description = "spotbuild.toml for this deployment: `terraform output -raw spotbuild_toml > spotbuild.toml`"
  value       = <<-TOML
    [registry]
    url = "${local.registry}/${var.name}"
    auth = "ecr"
    region = "${var.region}"

    [cloud]
    region = "${var.region}"
    subnets = ${jsonencode(var.subnet_ids)}
    instance_profile = "${aws_iam_instance_profile.instance.name}"
    untrusted_instance_profile = "${aws_iam_instance_profile.instance_untrusted.name}"
    security_groups = ["${aws_security_group.instances.id}"]
    root_volume_gb = ${var.root_volume_gb}
    tags = ${jsonencode(var.tags)}

    [cloud.x86_64]
    ami = "${local.ami_parameters.x86_64}"

    [cloud.arm64]
    ami = "${local.ami_parameters.arm64}"

    [remote]
    transport = "${var.transport}"

    [remote.ssm]
    bucket = "${aws_s3_bucket.transport.id}"
    prefix = "${var.transport_prefix}"
    role_id = "${aws_iam_role.instance.unique_id}"
    untrusted_role_id = "${aws_iam_role.instance_untrusted.unique_id}"

    [ledger]
    url = "s3://${aws_s3_bucket.spotbuild.id}/${var.ledger_prefix}"

    [trust]
    trusted_branches = ${jsonencode(var.trusted_branches)}
    untrusted_prefix = "${var.untrusted_prefix}"
  TOML
}
