#!/bin/sh
# After `packer build`: point the SSM parameter that launches resolve ([cloud] ami) at the
# new AMI. Usage: ami/publish.sh REGION PARAMETER (reads ami/packer-manifest.json).
set -eu
region=${1:?usage: publish.sh REGION PARAMETER}
parameter=${2:?usage: publish.sh REGION PARAMETER}
manifest=$(dirname "$0")/packer-manifest.json
ami=$(python3 -c 'import json,sys; b=json.load(open(sys.argv[1]))["builds"][-1]; print(b["artifact_id"].split(":")[1])' "$manifest")
aws ssm put-parameter --region "$region" --name "$parameter" --type String --data-type aws:ec2:image --value "$ami" --overwrite
echo "$parameter -> $ami"
