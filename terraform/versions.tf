terraform {
  required_version = ">= 1.5.0"
  required_providers {
    aws = {
      source = "hashicorp/aws"
      # 6.8.0 is the first release whose aws_ecr_repository takes IMMUTABLE_WITH_EXCLUSION
      # and image_tag_mutability_exclusion_filter (the trusted repositories use both).
      version = ">= 6.8.0"
    }
  }
}
