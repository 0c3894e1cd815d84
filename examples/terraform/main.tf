# A worked example: spotbuild for the monorepo in examples/monorepo, in two subnets, with
# the SSM transport (no inbound port) and CI roles from another account allowed to run it:
# one for trusted jobs (main, tags) and one for pull-request jobs, which get the untrusted
# controller role (untrusted instances, the untrusted namespace, the ledger's untrusted
# part). The CI account's roles decide which job gets which: circleci-oidc's trust policy
# accepts only CircleCI OIDC tokens whose oidc.circleci.com/vcs-ref claim is
# refs/heads/main or refs/tags/*, and every other job (pull requests) assumes
# circleci-oidc-pull-requests, which may assume only the untrusted controller role.
#
#   make -C ../.. reaper-zip     # the reaper's Lambda function (target/lambda/reaper.zip)
#   terraform init && terraform apply
#   terraform output -raw spotbuild_toml > ../monorepo/spotbuild.toml

terraform {
  required_version = ">= 1.5.0"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 6.8.0"
    }
  }
}

provider "aws" {
  region = "us-east-2"
}

module "spotbuild" {
  source             = "../../terraform"
  region             = "us-east-2"
  subnet_ids         = ["subnet-0a1b2c3d4e5f60718", "subnet-1b2c3d4e5f6071829"]
  transport          = "ssm"
  repositories       = ["base", "api", "web", "lint"]
  ledger_bucket_name = "acme-spotbuild-ledger"
  # The scheduled reaper: `make reaper-zip` builds it.
  reaper_zip = "${path.module}/../../target/lambda/reaper.zip"
  controller_principals = [
    "arn:aws:iam::210987654321:role/circleci-oidc",
  ]
  untrusted_controller_principals = [
    "arn:aws:iam::210987654321:role/circleci-oidc-pull-requests",
  ]
  tags = {
    team        = "platform"
    cost-center = "ci"
  }
}

output "spotbuild_toml" {
  value = module.spotbuild.spotbuild_toml
}
