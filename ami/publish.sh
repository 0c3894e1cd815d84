#!/bin/sh
# After `packer build`: point each architecture's SSM parameter, PREFIX-<arch>, at the AMI
# this run baked for it ([cloud.x86_64] ami and [cloud.arm64] ami resolve them at every
# launch). Only the manifest's last run counts (the manifest keeps every run's entries), so
# an architecture not baked this time keeps its image. With ARCH arguments, each of them
# must have been baked, or nothing is published.
# Usage: ami/publish.sh REGION PREFIX [ARCH...] (reads ami/packer-manifest.json).
set -eu
usage="usage: publish.sh REGION PREFIX [ARCH...]"
region=${1:?$usage}
prefix=${2:?$usage}
shift 2
manifest=$(dirname "$0")/packer-manifest.json
[ -f "$manifest" ] || { echo "publish.sh: $manifest not found: run packer build first" >&2; exit 1; }
# "ARCH AMI" lines: the last run's builds, by the arch the template records in
# custom_data, and the AMI in REGION (artifact_id is "region:ami,region:ami").
images=$(python3 - "$manifest" "$region" "$@" <<'PY'
import json, sys
manifest, region, wanted = sys.argv[1], sys.argv[2], sys.argv[3:]
with open(manifest) as f:
    m = json.load(f)
run = m.get("last_run_uuid")
found = {}
for b in m.get("builds", []):
    if b.get("packer_run_uuid") != run:
        continue
    # Not the entry's "name": both builds share the source, whose label that is.
    arch = (b.get("custom_data") or {}).get("arch")
    if not arch:
        sys.exit(f"publish.sh: a build of the last run records no custom_data.arch: {b.get('artifact_id')}")
    amis = dict(p.split(":", 1) for p in b["artifact_id"].split(",") if ":" in p)
    if region not in amis:
        sys.exit(f"publish.sh: the {arch} image of the last run is not in {region}: {b['artifact_id']}")
    found[arch] = amis[region]
for arch in wanted:
    if arch not in found:
        sys.exit(f"publish.sh: the last packer run baked no {arch} image (it baked: {', '.join(sorted(found)) or 'none'})")
if not found:
    sys.exit("publish.sh: the last packer run baked no image")
for arch in wanted or sorted(found):
    print(arch, found[arch])
PY
)
echo "$images" | while read -r arch ami; do
  parameter="$prefix-$arch"
  aws ssm put-parameter --region "$region" --name "$parameter" --type String --data-type aws:ec2:image --value "$ami" --overwrite >/dev/null
  echo "$parameter -> $ami"
done
