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
  description = "[cloud] ami (the SSM parameter `make ami` updates)"
  value       = var.ami_parameter
}

output "instance_profile" {
  description = "[cloud] instance_profile"
  value       = aws_iam_instance_profile.instance.name
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
  value       = aws_s3_bucket.spotbuild.id
}

output "transport_prefix" {
  description = "[remote.ssm] prefix"
  value       = var.transport_prefix
}

output "ledger" {
  description = "[ledger] url"
  value       = "s3://${aws_s3_bucket.spotbuild.id}/${var.ledger_prefix}"
}

output "launch_template_id" {
  description = "The launch template with the instances' settings (IMDSv2, encrypted gp3, terminate on shutdown)"
  value       = aws_launch_template.instances.id
}

output "controller_policy_arn" {
  description = "Attach to the CI role that runs spotbuild"
  value       = aws_iam_policy.controller.arn
}

output "controller_role_arn" {
  description = "The controller role, when controller_principals was given"
  value       = length(aws_iam_role.controller) > 0 ? aws_iam_role.controller[0].arn : null
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
    ami = "${var.ami_parameter}"
    subnets = ${jsonencode(var.subnet_ids)}
    instance_profile = "${aws_iam_instance_profile.instance.name}"
    security_groups = ["${aws_security_group.instances.id}"]
    root_volume_gb = ${var.root_volume_gb}
    tags = ${jsonencode(var.tags)}

    [remote]
    transport = "${var.transport}"

    [remote.ssm]
    bucket = "${aws_s3_bucket.spotbuild.id}"
    prefix = "${var.transport_prefix}"

    [ledger]
    url = "s3://${aws_s3_bucket.spotbuild.id}/${var.ledger_prefix}"
  TOML
}
