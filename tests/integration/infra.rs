//! The infrastructure as code: every Terraform and Packer file parses, checkov reports no
//! failed check (skips carry their reasons inline), the Packer template declares exactly the
//! variables it uses, shellcheck passes on every shell script, and the launch template and
//! the IAM policies keep the properties the design relies on. The tools come from
//! `make infra-deps` (the infra venv and Debian's shellcheck); a missing one fails the test.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn infra_tool(name: &str) -> PathBuf {
    let p = root().join(".venv-infra/bin").join(name);
    assert!(p.is_file(), "{} not found: run `make infra-deps` (`make test` does)", p.display());
    p
}

/// Files tracked by git (or, outside a checkout, found on disk) under `dir` ending in `ext`.
fn files(dir: &str, ext: &str) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(root().join(dir))
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .filter_map(|e| e.ok())
        .map(|e| format!("{dir}/{}", e.file_name().to_string_lossy()))
        .filter(|p| p.ends_with(ext))
        .collect();
    out.sort();
    out
}

/// Parses HCL files with python-hcl2; values come back as one-element lists, which `one`
/// unwraps.
fn hcl(paths: &[String]) -> Value {
    let out = Command::new(root().join("scripts/hcl2json")).current_dir(root()).args(paths).output().unwrap();
    assert!(out.status.success(), "hcl2json failed:\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn one(v: &Value) -> &Value {
    match v {
        Value::Array(a) if a.len() == 1 => &a[0],
        other => other,
    }
}

fn strings(v: &Value) -> Vec<String> {
    match one(v) {
        Value::Array(a) => a.iter().filter_map(|s| s.as_str().map(String::from)).collect(),
        Value::String(s) => vec![s.clone()],
        _ => Vec::new(),
    }
}

/// `resource "TYPE" "NAME"` from a parsed file.
fn resource<'a>(file: &'a Value, kind: &str, name: &str) -> &'a Value {
    file["resource"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|r| r.get(kind).and_then(|k| k.get(name)))
        .unwrap_or_else(|| panic!("no resource {kind}.{name}"))
}

/// Every statement of a policy document, including `dynamic "statement"` contents.
fn statements(doc: &Value) -> Vec<Value> {
    let mut out: Vec<Value> = doc["statement"].as_array().cloned().unwrap_or_default();
    for d in doc["dynamic"].as_array().cloned().unwrap_or_default() {
        if let Some(c) = d["statement"]["content"].as_array() {
            out.extend(c.iter().cloned());
        }
    }
    out
}

fn find_policy_doc<'a>(file: &'a Value, name: &str) -> Option<&'a Value> {
    file["data"].as_array()?.iter().find_map(|d| d.get("aws_iam_policy_document").and_then(|k| k.get(name)))
}

fn policy_doc<'a>(file: &'a Value, name: &str) -> &'a Value {
    find_policy_doc(file, name).unwrap_or_else(|| panic!("no policy document {name}"))
}

/// What policy document `name` grants in effect: its own statements and those of the
/// documents it pulls in through `source_policy_documents`
/// (`${data.aws_iam_policy_document.X.json}`), found among `files`, recursively.
fn effective_statements(files: &[&Value], name: &str) -> Vec<Value> {
    let doc = files.iter().find_map(|f| find_policy_doc(f, name)).unwrap_or_else(|| panic!("no policy document {name}"));
    let mut out = statements(doc);
    for source in strings(&doc["source_policy_documents"]) {
        let inner = source
            .strip_prefix("${data.aws_iam_policy_document.")
            .and_then(|s| s.strip_suffix(".json}"))
            .map(|s| s.split('[').next().unwrap_or(s))
            .unwrap_or_else(|| panic!("{name}: a source document that is not one of the module's policy documents: {source}"));
        assert_ne!(inner, name, "{name} pulls in itself");
        out.extend(effective_statements(files, inner));
    }
    out
}

/// Where an instance may write: its own transport objects, under its session's
/// `aws:userid` ("<role unique id>:<instance id>"), escaped so Terraform leaves it to IAM.
const OWN_TRANSPORT_OBJECTS: &str = "${aws_s3_bucket.transport.arn}/${var.transport_prefix}/$${aws:userid}/*";

/// ECR actions that write a repository.
const ECR_WRITES: [&str; 4] = ["ecr:PutImage", "ecr:InitiateLayerUpload", "ecr:UploadLayerPart", "ecr:CompleteLayerUpload"];

/// `pattern` with `*` matching any run of characters (ECR's WILDCARD filters).
fn wildcard(pattern: &str, s: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == s,
        Some((head, rest)) => s.starts_with(head) && (head.len()..=s.len()).any(|i| wildcard(rest, &s[i..])),
    }
}

fn condition(st: &Value) -> Vec<(String, String, Vec<String>)> {
    st["condition"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .map(|c| (one(&c["test"]).as_str().unwrap().to_string(), one(&c["variable"]).as_str().unwrap().to_string(), strings(&c["values"])))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn every_terraform_and_packer_file_parses() {
    let mut paths = files("terraform", ".tf");
    paths.extend(files("examples/terraform", ".tf"));
    paths.extend(files("ami", ".pkr.hcl"));
    assert!(paths.len() >= 7, "{paths:?}");
    let parsed = hcl(&paths);
    for p in &paths {
        assert!(parsed[p].is_object(), "{p} did not parse");
    }
}

#[test]
fn checkov_reports_no_failed_check_and_every_skip_has_a_reason() {
    let checkov = infra_tool("checkov");
    for dir in ["terraform", "examples/terraform"] {
        // --skip-download: nothing is fetched from the network. Not --quiet: it leaves the
        // skipped checks out of the report, and their reasons are checked below.
        let out = Command::new(&checkov)
            .current_dir(root())
            .args(["-d", dir, "--framework", "terraform", "--compact", "--skip-download", "-o", "json"])
            .output()
            .unwrap();
        let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("checkov on {dir}: {e}\n{}", String::from_utf8_lossy(&out.stderr)));
        let summary = &report["summary"];
        assert_eq!(summary["parsing_errors"], 0, "{dir}: {summary}");
        let failed: Vec<String> = report["results"]["failed_checks"]
            .as_array()
            .map(|a| a.iter().map(|c| format!("{} {} ({})", c["check_id"], c["resource"], c["file_path"])).collect())
            .unwrap_or_default();
        assert!(failed.is_empty(), "{dir}: checkov failed checks:\n{}", failed.join("\n"));
        assert!(summary["passed"].as_u64().unwrap() > 50, "{dir}: {summary}");
        let skipped = report["results"]["skipped_checks"].as_array().cloned().unwrap_or_default();
        assert_eq!(skipped.len() as u64, summary["skipped"].as_u64().unwrap(), "{dir}: every skip is in the report");
        assert!(!skipped.is_empty(), "{dir}: the module's documented skips are reported");
        for s in skipped {
            let reason = s["check_result"]["suppress_comment"].as_str().unwrap_or("");
            assert!(reason.len() > 20, "{dir}: {} on {} is skipped without a reason", s["check_id"], s["resource"]);
        }
    }
}

#[test]
fn the_packer_template_declares_exactly_the_variables_it_uses() {
    let path = "ami/spotbuild.pkr.hcl";
    let parsed = hcl(&[path.to_string()]);
    let declared: BTreeSet<String> = parsed[path]["variable"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|v| v.as_object().unwrap().keys().cloned())
        .collect();
    let text = std::fs::read_to_string(root().join(path)).unwrap();
    let used: BTreeSet<String> = regex::Regex::new(r"\bvar\.([A-Za-z_][A-Za-z0-9_-]*)")
        .unwrap()
        .captures_iter(&text)
        .map(|c| c[1].to_string())
        .collect();
    let undeclared: Vec<_> = used.difference(&declared).collect();
    let unused: Vec<_> = declared.difference(&used).collect();
    assert!(undeclared.is_empty(), "used but not declared: {undeclared:?}");
    assert!(unused.is_empty(), "declared but never used: {unused:?}");
    // Every provisioning script it names exists.
    for script in regex::Regex::new(r#"scripts/([a-z-]+\.sh)"#).unwrap().captures_iter(&text) {
        assert!(root().join("ami/scripts").join(&script[1]).is_file(), "missing ami/scripts/{}", &script[1]);
    }
}

#[test]
fn shellcheck_passes_on_every_shell_script() {
    let shellcheck = ["/usr/bin/shellcheck", "/bin/shellcheck"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .expect("shellcheck not found: install Debian's shellcheck (`make test` does)");
    let mut scripts = Vec::new();
    let mut walk = vec![root()];
    while let Some(dir) = walk.pop() {
        for e in std::fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()) {
            let p = e.path();
            let name = e.file_name().to_string_lossy().to_string();
            if p.is_dir() {
                if !matches!(name.as_str(), "target" | ".git" | ".venv" | ".venv-infra" | ".farm" | "node_modules") {
                    walk.push(p);
                }
                continue;
            }
            let head = std::fs::read(&p).map(|b| b.into_iter().take(64).collect::<Vec<u8>>()).unwrap_or_default();
            let shebang = String::from_utf8_lossy(&head);
            let first = shebang.lines().next().unwrap_or("");
            if name.ends_with(".sh") || (first.starts_with("#!") && (first.ends_with("/sh") || first.ends_with("bash") || first.contains("/sh ") || first.contains("env bash"))) {
                scripts.push(p);
            }
        }
    }
    scripts.sort();
    assert!(scripts.len() >= 10, "found only {scripts:?}");
    let out = Command::new(shellcheck).args(&scripts).output().unwrap();
    assert!(out.status.success(), "shellcheck:\n{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn the_launch_template_and_the_policies_keep_their_guarantees() {
    let main = "terraform/main.tf".to_string();
    let controller = "terraform/controller.tf".to_string();
    let parsed = hcl(&[main.clone(), controller.clone()]);
    let (main, controller) = (&parsed[&main], &parsed[&controller]);

    // Launch template: IMDSv2 only, hop limit 1, terminate on shutdown, encrypted gp3.
    let lt = resource(main, "aws_launch_template", "instances");
    let md = one(&lt["metadata_options"]);
    assert_eq!(one(&md["http_tokens"]), "required");
    assert_eq!(one(&md["http_put_response_hop_limit"]), 1);
    assert_eq!(one(&lt["instance_initiated_shutdown_behavior"]), "terminate");
    let ebs = one(&one(&lt["block_device_mappings"])["ebs"]);
    assert_eq!(one(&ebs["encrypted"]), true);
    assert_eq!(one(&ebs["volume_type"]), "gp3");
    assert_eq!(one(&ebs["delete_on_termination"]), true);
    // One template per architecture, each launching from its architecture's AMI parameter:
    // PREFIX-x86_64 and PREFIX-arm64, PREFIX an SSM parameter path.
    assert_eq!(one(&lt["for_each"]), "${local.ami_parameters}");
    assert_eq!(one(&lt["image_id"]), "resolve:ssm:${each.value}");
    let local = |name: &str| main["locals"].as_array().unwrap().iter().find_map(|l| l.get(name)).unwrap_or_else(|| panic!("no local.{name}")).clone();
    assert_eq!(strings(&local("arches")), ["x86_64", "arm64"]);
    let parameters = one(&local("ami_parameters")).as_str().unwrap().replace(' ', "");
    assert!(parameters.contains("forainlocal.arches:a=>\"${var.ami_parameter_prefix}-${a}\""), "{parameters}");
    let variables = hcl(&["terraform/variables.tf".to_string()]);
    let prefix = variables["terraform/variables.tf"]["variable"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|v| v.get("ami_parameter_prefix"))
        .expect("variable ami_parameter_prefix");
    assert_eq!(one(&prefix["default"]), "/spotbuild/ami/latest");
    let rule = one(&one(&prefix["validation"])["condition"]).as_str().unwrap().to_string();
    assert!(rule.contains("regex(\"^/"), "the prefix must start with /: {rule}");

    // No inbound rule in SSM mode: the only ingress resource is SSH, empty unless ssh.
    let ingress: Vec<&Value> = main["resource"].as_array().unwrap().iter().filter_map(|r| r.get("aws_vpc_security_group_ingress_rule")).collect();
    assert_eq!(ingress.len(), 1);
    let ssh = &ingress[0]["ssh"];
    assert!(one(&ssh["for_each"]).as_str().unwrap().contains("local.ssm_mode ? toset([])"), "{ssh}");
    assert_eq!(one(&ssh["from_port"]), 22);

    // Controller: no wildcard actions; launches need the build-id tag in the request;
    // teardown needs it on the resource; PassRole only the instance role. Its statements
    // include those it shares with the untrusted controller.
    let docs = effective_statements(&[main, controller], "controller");
    let tagged_request = |st: &Value| condition(st).iter().any(|(t, v, vals)| t == "Null" && v == "aws:RequestTag/${local.build_tag}" && vals == &["false"]);
    let tagged_resource = |st: &Value, key: &str| condition(st).iter().any(|(t, v, vals)| t == "Null" && v == &format!("{key}/${{local.build_tag}}") && vals == &["false"]);
    let mut saw = BTreeSet::new();
    for st in &docs {
        let actions = strings(&st["actions"]);
        let resources = strings(&st["resources"]);
        assert!(!actions.iter().any(|a| a == "*" || a.ends_with(":*")), "a wildcard action: {st}");
        if actions.iter().any(|a| a == "ec2:RunInstances" || a == "ec2:CreateFleet") && resources.iter().any(|r| r.contains(":instance/")) {
            assert!(tagged_request(st), "launching instances without the tag condition: {st}");
            saw.insert("launch");
        }
        if actions.iter().any(|a| a == "ec2:TerminateInstances") {
            assert!(tagged_resource(st, "ec2:ResourceTag"), "terminating untagged instances: {st}");
            saw.insert("terminate");
        }
        if actions.iter().any(|a| a == "iam:PassRole") {
            assert_eq!(resources, ["${aws_iam_role.instance.arn}"], "PassRole beyond the instance role: {st}");
            saw.insert("passrole");
        }
        if actions.iter().any(|a| a == "ssm:SendCommand") && resources.iter().any(|r| r.contains(":instance/")) {
            assert!(tagged_resource(st, "ssm:resourceTag"), "commands to untagged instances: {st}");
            saw.insert("ssm");
        }
        if actions.iter().any(|a| a == "ec2:CreateTags") {
            assert!(condition(st).iter().any(|(_, v, _)| v == "ec2:CreateAction"), "tagging outside a launch: {st}");
        }
    }
    assert_eq!(saw, ["launch", "passrole", "ssm", "terminate"].into_iter().collect());
    // Both controllers resolve each architecture's AMI parameter, and no other parameter.
    let parameter_arn = |arch: &str| format!("arn:${{local.partition}}:ssm:${{var.region}}:${{local.account}}:parameter${{local.ami_parameters.{arch}}}");
    for name in ["controller", "controller_untrusted"] {
        let reads: Vec<String> = effective_statements(&[main, controller], name)
            .iter()
            .filter(|st| strings(&st["actions"]).iter().any(|a| a.starts_with("ssm:GetParameter")))
            .flat_map(|st| strings(&st["resources"]))
            .collect();
        assert_eq!(reads, [parameter_arn("x86_64"), parameter_arn("arm64")], "{name} resolves other parameters than the AMIs'");
    }

    // Instances: the one S3 write is PutObject of their own transport objects, in the
    // transport bucket under their aws:userid; ECR push only to the projects.
    let mut s3 = 0;
    for st in effective_statements(&[main, controller], "instance") {
        let actions = strings(&st["actions"]);
        let resources = strings(&st["resources"]);
        if actions.iter().any(|a| a.starts_with("s3:")) {
            assert_eq!(actions, ["s3:PutObject"], "{st}");
            assert_eq!(resources, [OWN_TRANSPORT_OBJECTS], "{st}");
            s3 += 1;
        }
        if actions.iter().any(|a| a == "ecr:PutImage") {
            assert_eq!(resources, ["${local.repo_arns}"]);
        }
    }
    assert_eq!(s3, 1, "the instances write their transport objects");
    // SSM core only in SSM mode, for both instance roles.
    for name in ["ssm_core", "ssm_core_untrusted"] {
        let core = resource(main, "aws_iam_role_policy_attachment", name);
        assert_eq!(one(&core["count"]), "${local.ssm_mode ? 1 : 0}", "{name}");
    }

    // Images: every image counts toward the cap, untagged ones expire; in the untrusted
    // namespace every image expires by age.
    let lifecycle = one(&resource(main, "aws_ecr_lifecycle_policy", "project")["policy"]).as_str().unwrap().to_string();
    assert!(lifecycle.contains("tagStatus = \"any\"") || lifecycle.contains("'tagStatus': 'any'"), "{lifecycle}");
    assert!(lifecycle.contains("untagged"), "{lifecycle}");
    let lifecycle = one(&resource(main, "aws_ecr_lifecycle_policy", "untrusted")["policy"]).as_str().unwrap().to_string();
    assert!(lifecycle.contains("tagStatus = \"any\"") || lifecycle.contains("'tagStatus': 'any'"), "{lifecycle}");
    assert!(lifecycle.contains("var.untrusted_image_days") && lifecycle.contains("sinceImagePushed"), "{lifecycle}");
    // Buckets: encrypted with KMS, no public access, TLS only; the ledger versioned, the
    // transport bucket not (its objects live minutes) and emptied by its lifecycle.
    let versioning = resource(main, "aws_s3_bucket_versioning", "spotbuild");
    assert_eq!(one(&one(&versioning["versioning_configuration"])["status"]), "Enabled");
    assert!(main["resource"].as_array().unwrap().iter().all(|r| r.get("aws_s3_bucket_versioning").and_then(|v| v.get("transport")).is_none()), "the transport bucket keeps no versions");
    for bucket in ["spotbuild", "transport"] {
        let sse = resource(main, "aws_s3_bucket_server_side_encryption_configuration", bucket);
        assert_eq!(one(&one(&one(&sse["rule"])["apply_server_side_encryption_by_default"])["sse_algorithm"]), "aws:kms", "{bucket}");
        let block = resource(main, "aws_s3_bucket_public_access_block", bucket);
        for k in ["block_public_acls", "block_public_policy", "ignore_public_acls", "restrict_public_buckets"] {
            assert_eq!(one(&block[k]), true, "{bucket}: {k}");
        }
        let ownership = resource(main, "aws_s3_bucket_ownership_controls", bucket);
        assert_eq!(one(&one(&ownership["rule"])["object_ownership"]), "BucketOwnerEnforced", "{bucket}");
        assert!(resource(main, "aws_s3_bucket_policy", bucket).is_object(), "{bucket}");
    }
    let expiry = one(&resource(main, "aws_s3_bucket_lifecycle_configuration", "transport")["rule"]);
    assert_eq!(one(&expiry["filter"]), &serde_json::json!({}), "every transport object expires: {expiry}");
    assert_eq!(one(&one(&expiry["expiration"])["days"]), "${var.transport_object_days}");
    assert_eq!(one(&one(&expiry["abort_incomplete_multipart_upload"])["days_after_initiation"]), 1);
    // Archived logs (trusted and untrusted) expire after the retention the team chose.
    let rules = resource(main, "aws_s3_bucket_lifecycle_configuration", "spotbuild")["rule"].clone();
    for prefix in ["${var.ledger_prefix}/logs/", "${var.ledger_prefix}/untrusted/logs/"] {
        let rule = rules
            .as_array()
            .unwrap()
            .iter()
            .find(|r| one(&one(&r["filter"])["prefix"]) == prefix)
            .unwrap_or_else(|| panic!("no lifecycle rule for {prefix}: {rules}"));
        assert_eq!(one(&one(&rule["expiration"])["days"]), "${var.log_retention_days}", "{rule}");
    }
    let tls = statements(policy_doc(main, "transport_bucket"));
    assert!(
        tls.iter().any(|st| strings(&st["effect"]) == ["Deny"] && condition(st).iter().any(|(t, v, vals)| t == "Bool" && v == "aws:SecureTransport" && vals == &["false"])),
        "the transport bucket takes TLS only: {tls:?}"
    );
}

#[test]
fn untrusted_code_cannot_write_the_trusted_cache_or_the_ledger() {
    let main = "terraform/main.tf".to_string();
    let controller = "terraform/controller.tf".to_string();
    let parsed = hcl(&[main.clone(), controller.clone()]);
    let (main, controller) = (&parsed[&main], &parsed[&controller]);
    let files = [main, controller];
    let local = |name: &str| -> String {
        let l = main["locals"].as_array().unwrap().iter().find_map(|l| l.get(name)).unwrap_or_else(|| panic!("no local.{name}"));
        one(l).as_str().unwrap().to_string()
    };

    // The two namespaces: the projects' repositories and, under the untrusted prefix, the
    // pull requests'. The ARN lists the policies use are exactly these.
    assert_eq!(local("repo_arns"), "${[for r in aws_ecr_repository.project : r.arn]}");
    assert_eq!(local("untrusted_repo_arns"), "${[for r in aws_ecr_repository.untrusted : r.arn]}");
    let trusted = resource(main, "aws_ecr_repository", "project");
    let untrusted = resource(main, "aws_ecr_repository", "untrusted");
    assert_eq!(one(&trusted["name"]), "${var.name}/${each.value}");
    assert_eq!(one(&untrusted["name"]), "${var.name}/${var.untrusted_prefix}/${each.value}");
    assert_eq!(one(&one(&untrusted["encryption_configuration"])["encryption_type"]), "KMS");
    assert_eq!(one(&one(&untrusted["image_scanning_configuration"])["scan_on_push"]), true);

    // (a) Untrusted instances pull the projects and write only their own namespace.
    let is_trusted_repo = |r: &String| r.contains("local.repo_arns") || r.contains("aws_ecr_repository.project");
    let mut pulls_trusted = false;
    let mut pushes = 0;
    let mut denies_parameters = false;
    for st in effective_statements(&files, "instance_untrusted") {
        let actions = strings(&st["actions"]);
        let resources = strings(&st["resources"]);
        if strings(&st["effect"]) == ["Deny"] {
            // SSM core lets an instance read every parameter; untrusted code reads none.
            denies_parameters |= resources == ["*"] && ["ssm:GetParameter", "ssm:GetParameters", "ssm:GetParametersByPath"].iter().all(|a| actions.iter().any(|x| x == a));
            continue;
        }
        if actions.iter().any(|a| ECR_WRITES.contains(&a.as_str())) {
            assert!(!resources.iter().any(is_trusted_repo), "untrusted instances write the trusted repositories: {st}");
            assert_eq!(resources, ["${local.untrusted_repo_arns}"], "untrusted instances write beyond their namespace: {st}");
            pushes += 1;
        }
        if resources.iter().any(is_trusted_repo) {
            assert!(actions.iter().all(|a| a.starts_with("ecr:") && !ECR_WRITES.contains(&a.as_str())), "{st}");
            pulls_trusted |= actions.iter().any(|a| a == "ecr:BatchGetImage");
        }
        assert!(!actions.iter().any(|a| a.contains('*')), "a wildcard action: {st}");
    }
    assert!(pulls_trusted, "untrusted instances read the trusted cache");
    assert!(denies_parameters, "untrusted instances may read SSM parameters");
    // No controller may list commands: ListCommands returns every command's parameters
    // (presigned URLs to jobs), and has no resource-level permissions.
    for name in ["controller", "controller_untrusted"] {
        for st in effective_statements(&files, name) {
            assert!(!strings(&st["actions"]).iter().any(|a| a == "ssm:ListCommands"), "{name} lists commands: {st}");
        }
    }
    assert_eq!(pushes, 1, "untrusted instances push to their namespace");
    // The untrusted profile carries the untrusted role, whose one inline policy is that
    // document; besides it, only SSM core is attached.
    let profile = resource(main, "aws_iam_instance_profile", "instance_untrusted");
    assert_eq!(one(&profile["role"]), "${aws_iam_role.instance_untrusted.name}");
    let inline = resource(main, "aws_iam_role_policy", "instance_untrusted");
    assert_eq!(one(&inline["role"]), "${aws_iam_role.instance_untrusted.id}");
    assert_eq!(one(&inline["policy"]), "${data.aws_iam_policy_document.instance_untrusted.json}");
    for r in main["resource"].as_array().unwrap() {
        for (kind, name) in [("aws_iam_role_policy_attachment", "attachment"), ("aws_iam_role_policy", "inline policy")] {
            for (id, res) in r.get(kind).and_then(|k| k.as_object()).into_iter().flatten() {
                let role = one(&res["role"]).as_str().unwrap_or("");
                if !role.starts_with("${aws_iam_role.instance") {
                    continue;
                }
                match kind {
                    "aws_iam_role_policy" => assert!(matches!(id.as_str(), "instance" | "instance_untrusted"), "another {name} on an instance role: {id}"),
                    _ => assert!(strings(&res["policy_arn"])[0].ends_with(":iam::aws:policy/AmazonSSMManagedInstanceCore"), "another {name} on an instance role: {id}"),
                }
            }
        }
    }

    // (b) No instance, trusted or not, reaches the ledger: the one S3 action of each, in
    // its own statements or those it shares, is PutObject of its own transport objects.
    for name in ["instance", "instance_untrusted"] {
        let mut s3 = 0;
        for st in effective_statements(&files, name) {
            let actions = strings(&st["actions"]);
            let resources = strings(&st["resources"]);
            assert!(
                !resources.iter().any(|r| r.contains("aws_s3_bucket.spotbuild") || r.contains("var.ledger_prefix")),
                "{name} reaches the ledger: {st}"
            );
            if actions.iter().any(|a| a.starts_with("s3:")) {
                assert_eq!(actions, ["s3:PutObject"], "{name}: {st}");
                assert_eq!(resources, [OWN_TRANSPORT_OBJECTS], "{name}: {st}");
                s3 += 1;
            }
        }
        assert_eq!(s3, 1, "{name} writes its transport objects");
    }

    // (c) The trusted cache is immutable: only branch-*, stage-* and buildcache-* tags move;
    // cache-<hash> (and the test passes recorded as cache-<hash>-<job>) never do.
    assert_eq!(one(&trusted["image_tag_mutability"]), "IMMUTABLE_WITH_EXCLUSION");
    let filters = trusted["image_tag_mutability_exclusion_filter"].as_array().cloned().unwrap_or_default();
    for f in &filters {
        assert_eq!(one(&f["filter_type"]), "WILDCARD", "{f}");
    }
    let excluded: BTreeSet<String> = filters.iter().map(|f| one(&f["filter"]).as_str().unwrap().to_string()).collect();
    assert_eq!(filters.len(), 3, "{filters:?}");
    assert_eq!(excluded, ["branch-*", "stage-*", "buildcache-*"].into_iter().map(String::from).collect());
    for tag in ["cache-3f9a2b", "cache-3f9a2b-test", "cache-3f9a2b-test-1"] {
        assert!(!excluded.iter().any(|p| wildcard(p, tag)), "{tag} could be rewritten");
    }
    assert!(excluded.iter().any(|p| wildcard(p, "branch-main")), "the wildcard matcher works");
    // The deploy environments' tags move too: deployed-* and each environment named, which
    // the variable's validation keeps out of cache-*.
    let dynamic = trusted["dynamic"].as_array().cloned().unwrap_or_default();
    let deploy_filters: Vec<&Value> = dynamic.iter().filter_map(|d| d.get("image_tag_mutability_exclusion_filter")).collect();
    assert_eq!(deploy_filters.len(), 1, "{dynamic:?}");
    // (python-hcl2 writes expressions back with single quotes and without spaces.)
    let norm = |v: &Value| v.as_str().unwrap_or("").replace(' ', "").replace('\'', "\"");
    assert_eq!(norm(one(&deploy_filters[0]["for_each"])), "${concat([\"deployed-*\"],var.deploy_environments)}", "{dynamic:?}");
    assert!(!wildcard("deployed-*", "cache-3f9a2b"));
    let variables = hcl(&["terraform/variables.tf".to_string()]);
    let environments = variables["terraform/variables.tf"]["variable"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|v| v.get("deploy_environments"))
        .expect("variable deploy_environments");
    let rule = norm(one(&one(&environments["validation"])["condition"]));
    assert!(rule.contains("!startswith(e,\"cache-\")"), "{rule}");
    assert_eq!(one(&untrusted["image_tag_mutability"]), "MUTABLE");

    // (d) The untrusted controller passes only the untrusted role, launches only with the
    // request's trust tag "untrusted", ends and commands only what carries it, and writes
    // only the ledger's untrusted part and the untrusted instances' transport objects.
    let ledger_objects = "${aws_s3_bucket.spotbuild.arn}/${var.ledger_prefix}/untrusted/";
    let untrusted_transport = "${aws_s3_bucket.transport.arn}/${var.transport_prefix}/${aws_iam_role.instance_untrusted.unique_id}:";
    let has = |st: &Value, test: &str, variable: &str, value: &str| condition(st).iter().any(|(t, v, vals)| t == test && v == variable && vals == &[value]);
    let untrusted_request = |st: &Value| has(st, "Null", "aws:RequestTag/${local.build_tag}", "false") && has(st, "StringEquals", "aws:RequestTag/${local.trust_tag}", "untrusted");
    let untrusted_resource = |st: &Value, key: &str| has(st, "StringEquals", &format!("{key}/${{local.trust_tag}}"), "untrusted");
    let mut saw = BTreeSet::new();
    for st in effective_statements(&files, "controller_untrusted") {
        let actions = strings(&st["actions"]);
        let resources = strings(&st["resources"]);
        assert!(!actions.iter().any(|a| a.contains('*')), "a wildcard action: {st}");
        assert!(!actions.iter().any(|a| ECR_WRITES.contains(&a.as_str())), "the untrusted controller writes images: {st}");
        let launch = actions.iter().any(|a| matches!(a.as_str(), "ec2:RunInstances" | "ec2:CreateFleet" | "ec2:CreateLaunchTemplate"));
        if launch && resources.iter().any(|r| r.contains(":instance/")) {
            assert!(untrusted_request(&st), "launching without the untrusted trust tag in the request: {st}");
            saw.insert("launch");
        }
        if launch && resources.iter().all(|r| r.contains(":launch-template/")) {
            assert!(untrusted_resource(&st, "ec2:ResourceTag"), "launching from a template not tagged untrusted: {st}");
            saw.insert("template");
        }
        if actions.iter().any(|a| matches!(a.as_str(), "ec2:TerminateInstances" | "ec2:DeleteLaunchTemplate" | "ec2:CancelSpotInstanceRequests")) {
            assert!(untrusted_resource(&st, "ec2:ResourceTag"), "ending what is not tagged untrusted: {st}");
            saw.insert("terminate");
        }
        if actions.iter().any(|a| a == "ec2:CreateTags") {
            assert!(condition(&st).iter().any(|(_, v, _)| v == "ec2:CreateAction"), "tagging outside a launch: {st}");
        }
        if actions.iter().any(|a| a == "iam:PassRole") {
            assert_eq!(resources, ["${aws_iam_role.instance_untrusted.arn}"], "PassRole beyond the untrusted instance role: {st}");
            assert!(has(&st, "StringEquals", "iam:PassedToService", "ec2.amazonaws.com"), "{st}");
            saw.insert("passrole");
        }
        if actions.iter().any(|a| a == "ssm:SendCommand") && resources.iter().any(|r| r.contains(":instance/")) {
            assert!(untrusted_resource(&st, "ssm:resourceTag"), "commands to instances not tagged untrusted: {st}");
            saw.insert("ssm");
        }
        if actions.iter().any(|a| a.starts_with("s3:")) {
            if actions.iter().any(|a| a == "s3:ListBucket") {
                // Listing (names only) is whole-bucket: S3 answers a missing key with 404,
                // not 403, only to a principal that may list without a prefix condition.
                assert_eq!(actions, ["s3:ListBucket"], "{st}");
                assert!(resources == ["${aws_s3_bucket.spotbuild.arn}"] || resources == ["${aws_s3_bucket.transport.arn}"], "listing another bucket: {st}");
                assert!(condition(&st).is_empty(), "a prefix condition turns missing keys into 403s: {st}");
                if resources == ["${aws_s3_bucket.spotbuild.arn}"] {
                    saw.insert("ledger-list");
                }
            } else {
                assert!(actions.iter().all(|a| matches!(a.as_str(), "s3:GetObject" | "s3:PutObject" | "s3:DeleteObject")), "{st}");
                for r in &resources {
                    if r.starts_with("${aws_s3_bucket.spotbuild.arn}") {
                        assert!(r.starts_with(ledger_objects), "ledger objects beyond the untrusted part: {st}");
                        saw.insert("ledger");
                    } else {
                        assert!(r.starts_with(untrusted_transport), "S3 beyond the ledger's untrusted part and untrusted transport objects: {st}");
                    }
                }
            }
        }
    }
    assert_eq!(saw, ["launch", "ledger", "ledger-list", "passrole", "ssm", "template", "terminate"].into_iter().collect());
    // The policy is that document, and the role (when principals are given) carries it.
    let policy = resource(controller, "aws_iam_policy", "controller_untrusted");
    assert_eq!(one(&policy["policy"]), "${data.aws_iam_policy_document.controller_untrusted.json}");
    let attachment = resource(controller, "aws_iam_role_policy_attachment", "controller_untrusted");
    assert_eq!(one(&attachment["role"]), "${aws_iam_role.controller_untrusted[0].name}");
    assert_eq!(one(&attachment["policy_arn"]), "${aws_iam_policy.controller_untrusted.arn}");
    let assume = statements(policy_doc(controller, "controller_untrusted_assume"));
    assert_eq!(assume.len(), 1, "{assume:?}");
    assert_eq!(strings(&one(&assume[0]["principals"])["identifiers"]), ["${var.untrusted_controller_principals}"]);
}

#[test]
fn the_reaper_runs_by_itself_with_least_privilege() {
    let path = "terraform/reaper.tf".to_string();
    let main = "terraform/main.tf".to_string();
    let parsed = hcl(&[path.clone(), main.clone()]);
    let (reaper, main) = (&parsed[&path], &parsed[&main]);

    // The function: spotbuild as `bootstrap` on the custom runtime, one pass at a time,
    // run by the schedule and by nothing else.
    let function = resource(reaper, "aws_lambda_function", "reaper");
    assert_eq!(one(&function["count"]), "${local.reaper_count}");
    assert_eq!(one(&function["runtime"]), "provided.al2023");
    assert_eq!(one(&function["handler"]), "bootstrap");
    assert_eq!(strings(&function["architectures"]), ["x86_64"]);
    assert_eq!(one(&function["reserved_concurrent_executions"]), 1);
    let env = one(&one(&function["environment"])["variables"]);
    for key in ["SPOTBUILD_LEDGER", "SPOTBUILD_REAP_HEARTBEAT_WINDOW"] {
        assert!(env.get(key).is_some(), "no {key} in the environment: {env}");
    }
    let rule = resource(reaper, "aws_cloudwatch_event_rule", "reaper");
    assert_eq!(one(&rule["schedule_expression"]), "${var.reaper_schedule}");
    let target = resource(reaper, "aws_cloudwatch_event_target", "reaper");
    assert_eq!(one(&target["arn"]), "${aws_lambda_function.reaper[0].arn}");
    let permission = resource(reaper, "aws_lambda_permission", "reaper");
    assert_eq!(one(&permission["principal"]), "events.amazonaws.com");
    assert_eq!(one(&permission["source_arn"]), "${aws_cloudwatch_event_rule.reaper[0].arn}");

    // Its log group: created here, kept a year, encrypted with the module's key, which lets
    // CloudWatch Logs use it for that log group only.
    let log_group = resource(reaper, "aws_cloudwatch_log_group", "reaper");
    assert_eq!(one(&log_group["name"]), "${local.reaper_log_group}");
    assert_eq!(one(&log_group["kms_key_id"]), "${aws_kms_key.spotbuild.arn}");
    assert!(one(&log_group["retention_in_days"]).as_u64().unwrap() >= 365, "{log_group}");
    let arn = reaper["locals"].as_array().unwrap().iter().find_map(|l| l.get("reaper_log_group_arn")).expect("local.reaper_log_group_arn");
    assert!(one(arn).as_str().unwrap().ends_with(":log-group:${local.reaper_log_group}"), "{arn}");
    let logs_key: Vec<Value> = statements(policy_doc(main, "key"))
        .into_iter()
        .filter(|st| strings(&one(&st["principals"])["identifiers"]).iter().any(|p| p.starts_with("logs.")))
        .collect();
    assert_eq!(logs_key.len(), 1, "{logs_key:?}");
    assert!(
        condition(&logs_key[0]).iter().any(|(t, v, vals)| t == "ArnEquals" && v == "kms:EncryptionContext:aws:logs:arn" && vals == &["${local.reaper_log_group_arn}"]),
        "CloudWatch Logs may use the key beyond the reaper's log group: {}",
        logs_key[0]
    );

    // Its policy: no wildcard action, nothing to launch with or pass a role to; ending only
    // what carries the build-id tag; resource "*" only for Describe; S3 only under the
    // ledger prefix; the key; its own log group.
    let docs = statements(policy_doc(reaper, "reaper"));
    let tagged_resource = |st: &Value| condition(st).iter().any(|(t, v, vals)| t == "Null" && v == "ec2:ResourceTag/${local.build_tag}" && vals == &["false"]);
    let mut saw = BTreeSet::new();
    for st in &docs {
        let actions = strings(&st["actions"]);
        let resources = strings(&st["resources"]);
        assert!(!actions.is_empty(), "a statement without actions: {st}");
        assert!(!actions.iter().any(|a| a.contains('*')), "a wildcard action: {st}");
        assert!(
            !actions.iter().any(|a| matches!(a.as_str(), "ec2:RunInstances" | "ec2:CreateFleet" | "ec2:CreateLaunchTemplate" | "iam:PassRole")),
            "the reaper may launch or pass a role: {st}"
        );
        if resources.iter().any(|r| r == "*") {
            assert!(actions.iter().all(|a| a.starts_with("ec2:Describe")), "resource \"*\" beyond Describe: {st}");
            saw.insert("describe");
        }
        if actions.iter().any(|a| matches!(a.as_str(), "ec2:TerminateInstances" | "ec2:DeleteLaunchTemplate" | "ec2:CancelSpotInstanceRequests")) {
            assert!(tagged_resource(st), "ending untagged resources: {st}");
            saw.insert("end");
        }
        if actions.iter().any(|a| a.starts_with("s3:")) {
            if actions.iter().any(|a| a == "s3:ListBucket") {
                assert_eq!(actions, ["s3:ListBucket"], "{st}");
                assert_eq!(resources, ["${aws_s3_bucket.spotbuild.arn}"], "{st}");
                assert!(condition(st).is_empty(), "a prefix condition turns missing heartbeats into 403s: {st}");
                saw.insert("list");
            } else {
                assert!(actions.iter().all(|a| a == "s3:GetObject" || a == "s3:PutObject"), "{st}");
                assert_eq!(resources, ["${aws_s3_bucket.spotbuild.arn}/${var.ledger_prefix}/*"], "S3 beyond the ledger prefix: {st}");
                saw.insert("ledger");
            }
        }
        if actions.iter().any(|a| a.starts_with("kms:")) {
            assert_eq!(resources, ["${aws_kms_key.spotbuild.arn}"], "{st}");
        }
        if actions.iter().any(|a| a.starts_with("logs:")) {
            assert!(!actions.iter().any(|a| a == "logs:CreateLogGroup"), "{st}");
            assert!(resources.iter().all(|r| r.starts_with("${aws_cloudwatch_log_group.reaper[0].arn}")), "logs beyond its own log group: {st}");
            saw.insert("logs");
        }
    }
    assert_eq!(saw, ["describe", "end", "ledger", "list", "logs"].into_iter().collect());
}

#[test]
fn the_outputs_name_every_spotbuild_toml_key_and_the_file_they_print_parses() {
    let path = "terraform/outputs.tf".to_string();
    let parsed = hcl(&[path.clone()]);
    let outputs: BTreeSet<String> = parsed[&path]["output"].as_array().unwrap().iter().flat_map(|o| o.as_object().unwrap().keys().cloned()).collect();
    for key in [
        "region",
        "subnets",
        "ami",
        "instance_profile",
        "untrusted_instance_profile",
        "security_groups",
        "registry",
        "transport",
        "transport_bucket",
        "instance_role_id",
        "untrusted_instance_role_id",
        "ledger",
        "trusted_branches",
        "untrusted_prefix",
        "controller_untrusted_role",
        "spotbuild_toml",
    ] {
        assert!(outputs.contains(key), "no output {key}");
    }
    // The printed file, with placeholders for what only AWS knows, is a valid config.
    let text = std::fs::read_to_string(root().join("terraform/outputs.tf")).unwrap();
    let toml = text.split("<<-TOML\n").nth(1).unwrap().split("  TOML\n").next().unwrap();
    let unindented = toml.replace("    ", "");
    let filled = regex::Regex::new(r"\$\{[^}]*\}").unwrap().replace_all(&unindented, "x");
    let filled = filled.replace("subnets = x", "subnets = [\"subnet-1\"]").replace("tags = x", "tags = {}").replace("root_volume_gb = x", "root_volume_gb = 200")
        .replace("transport = \"x\"", "transport = \"ssm\"").replace("trusted_branches = x", "trusted_branches = [\"main\"]");
    let config = spotbuild::settings::Config::parse(&filled, Path::new("spotbuild.toml")).unwrap_or_else(|e| panic!("{e}\n{filled}"));
    // Both trust levels are configured: the untrusted profile, both roles' ids (which
    // prefix their instances' transport objects), and the [trust] table.
    assert_eq!(config.cloud.untrusted_instance_profile.as_deref(), Some("x"), "{filled}");
    assert_eq!(config.remote.ssm.role_id.as_deref(), Some("x"), "{filled}");
    assert_eq!(config.remote.ssm.untrusted_role_id.as_deref(), Some("x"), "{filled}");
    assert_eq!(config.trust.trusted_branches, ["main"], "{filled}");
    // Each architecture's AMI in a table of its own, after every [cloud] key (a key below
    // a sub-table's header would belong to that table), and no top-level ami (x86_64's
    // shorthand).
    let table: toml::Table = toml::from_str(&filled).unwrap_or_else(|e| panic!("{e}\n{filled}"));
    let cloud = table.get("cloud").and_then(|c| c.as_table()).unwrap_or_else(|| panic!("no [cloud]: {filled}"));
    assert!(cloud.get("ami").is_none() && cloud.get("region").is_some(), "{filled}");
    for arch in ["x86_64", "arm64"] {
        let t = cloud.get(arch).and_then(|t| t.as_table()).unwrap_or_else(|| panic!("no [cloud.{arch}]: {filled}"));
        assert_eq!(t.keys().map(String::as_str).collect::<Vec<_>>(), ["ami"], "[cloud.{arch}]: {filled}");
        assert!(toml.contains(&format!("[cloud.{arch}]\n    ami = \"${{local.ami_parameters.{arch}}}\"\n")), "{toml}");
    }
    assert!(toml.contains("trusted_branches = ${jsonencode(var.trusted_branches)}"), "{toml}");
    assert!(toml.contains("untrusted_prefix = \"${var.untrusted_prefix}\""), "{toml}");
    assert!(toml.contains("bucket = \"${aws_s3_bucket.transport.id}\""), "{toml}");
    assert!(toml.contains("role_id = \"${aws_iam_role.instance.unique_id}\""), "{toml}");
    assert!(toml.contains("untrusted_role_id = \"${aws_iam_role.instance_untrusted.unique_id}\""), "{toml}");
}

#[test]
fn the_repository_builds_its_own_ci_image_under_a_content_hash() {
    // A clone, so commits here do not touch the checkout.
    let dir = tempfile::tempdir().unwrap();
    let clone = dir.path().join("spotbuild");
    let st = Command::new("git").args(["clone", "-q", "--no-hardlinks"]).arg(root()).arg(&clone).status().unwrap();
    assert!(st.success());
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .current_dir(&clone)
            .args(["-c", "user.name=t", "-c", "user.email=t@example.invalid", "-c", "commit.gpgsign=false"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let hash = || -> String {
        let run = crate::support::Run::of(crate::support::spotbuild(&clone).args(["plan", "--offline", "--json"]));
        assert_eq!(run.code, 0, "{}", run.stderr);
        let plan = run.json();
        let p = plan["projects"].as_array().unwrap().iter().find(|p| p["name"] == "spotbuild-ci").expect("spotbuild-ci is in the manifest").clone();
        p["hash"].as_str().unwrap().to_string()
    };
    let first = hash();
    assert_eq!(hash(), first, "the same sources give the same tag");
    std::fs::write(clone.join("README.md"), "not an input\n").unwrap();
    git(&["commit", "-qam", "docs"]);
    assert_eq!(hash(), first, "a file outside the image's inputs does not change it");
    std::fs::write(clone.join("src/main.rs"), format!("{}\n// changed\n", std::fs::read_to_string(clone.join("src/main.rs")).unwrap())).unwrap();
    git(&["commit", "-qam", "src"]);
    assert_ne!(hash(), first, "a source change gives a new tag");
}
