//! Manifest lists and OCI image indexes made from per-architecture images: the document
//! `spotbuild manifest create` puts under `cache-<hash>`.
//!
//! Children that are all Docker v2 manifests are joined in a Docker manifest list (what
//! Docker's own `manifest create` writes); any other mix, in an OCI image index. Children
//! are listed in architecture order, so the same images always give the same bytes (and
//! the same digest): creating it twice changes nothing.

use serde_json::json;

use crate::platform::Arch;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// One architecture's image, as the registry holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Child {
    pub arch: Arch,
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

/// The index (or manifest list) of `children`, and its media type.
pub fn index(children: &[Child]) -> (String, Vec<u8>) {
    let mut children: Vec<&Child> = children.iter().collect();
    children.sort_by_key(|c| c.arch);
    let docker = children.iter().all(|c| c.media_type == DOCKER_MANIFEST);
    let media_type = if docker { DOCKER_LIST } else { OCI_INDEX };
    let doc = json!({
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": children.iter().map(|c| json!({
            "mediaType": c.media_type,
            "digest": c.digest,
            "size": c.size,
            "platform": {"architecture": c.arch.oci(), "os": "linux"},
        })).collect::<Vec<_>>(),
    });
    (media_type.to_string(), serde_json::to_vec(&doc).expect("an index always serialises"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn child(arch: Arch, media_type: &str, n: u8) -> Child {
        Child {
            arch,
            media_type: media_type.into(),
            digest: format!("sha256:{}", format!("{n:02x}").repeat(32)),
            size: 500 + n as u64,
        }
    }

    #[test]
    fn an_oci_index_has_the_schema_fields_and_media_types() {
        let (mt, body) = index(&[child(Arch::Arm64, OCI_MANIFEST, 2), child(Arch::X86_64, OCI_MANIFEST, 1)]);
        assert_eq!(mt, OCI_INDEX);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["schemaVersion"], 2);
        assert_eq!(v["mediaType"], OCI_INDEX);
        let m = v["manifests"].as_array().unwrap();
        assert_eq!(m.len(), 2);
        // Architecture order, whatever the input order: the same images, the same bytes.
        assert_eq!(m[0]["platform"], json!({"architecture": "amd64", "os": "linux"}));
        assert_eq!(m[1]["platform"], json!({"architecture": "arm64", "os": "linux"}));
        for (e, n) in m.iter().zip([1u8, 2]) {
            assert_eq!(e["mediaType"], OCI_MANIFEST);
            assert_eq!(e["size"], 500 + n as u64);
            let d = e["digest"].as_str().unwrap();
            assert!(d.starts_with("sha256:") && d.len() == 71, "{d}");
            // Only the fields the image-index schema defines for a descriptor.
            let keys: Vec<&String> = e.as_object().unwrap().keys().collect();
            assert!(keys.iter().all(|k| ["mediaType", "digest", "size", "platform", "annotations", "urls"].contains(&k.as_str())), "{keys:?}");
        }
        assert_eq!(index(&[child(Arch::X86_64, OCI_MANIFEST, 1), child(Arch::Arm64, OCI_MANIFEST, 2)]).1, body);
    }

    #[test]
    fn docker_manifests_make_a_docker_manifest_list() {
        let (mt, body) = index(&[child(Arch::X86_64, DOCKER_MANIFEST, 1), child(Arch::Arm64, DOCKER_MANIFEST, 2)]);
        assert_eq!(mt, DOCKER_LIST);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["mediaType"], DOCKER_LIST);
        let (mixed, _) = index(&[child(Arch::X86_64, DOCKER_MANIFEST, 1), child(Arch::Arm64, OCI_MANIFEST, 2)]);
        assert_eq!(mixed, OCI_INDEX);
    }
}

/// What `create` did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Created {
    pub repository: String,
    pub tag: String,
    pub media_type: String,
    pub digest: String,
    /// `arch@digest` of each child.
    pub children: Vec<String>,
    /// The tag already pointed at this very index: nothing was written.
    pub unchanged: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("{repository} has no {} image at this hash ({})", names(missing), tags(missing, hash))]
    MissingArch { repository: String, hash: String, missing: Vec<Arch> },
    #[error(transparent)]
    Registry(#[from] super::RegistryError),
}

fn names(arches: &[Arch]) -> String {
    arches.iter().map(|a| a.as_str()).collect::<Vec<_>>().join(" or ")
}

fn tags(arches: &[Arch], hash: &str) -> String {
    arches.iter().map(|a| a.tag(hash)).collect::<Vec<_>>().join(", ")
}

/// Joins the images tagged `cache-<hash>-<arch>` of `repository`, one per arch of
/// `arches`, under `cache-<hash>`, through the registry API. Refused, writing nothing,
/// when an arch's image is missing. Idempotent: the same images give the same index.
pub async fn create(client: &super::Client, repository: &str, hash: &str, arches: &[Arch]) -> Result<Created, IndexError> {
    let mut children = Vec::new();
    let mut missing = Vec::new();
    for &arch in arches {
        match client.manifest_if_any(repository, &arch.tag(hash)).await? {
            Some((media_type, body)) => children.push(Child {
                arch,
                media_type: media_type.to_str().unwrap_or(OCI_MANIFEST).split(';').next().unwrap_or(OCI_MANIFEST).trim().to_string(),
                digest: super::copy::sha256_digest(&body),
                size: body.len() as u64,
            }),
            None => missing.push(arch),
        }
    }
    if !missing.is_empty() {
        return Err(IndexError::MissingArch {
            repository: repository.to_string(),
            hash: hash.to_string(),
            missing,
        });
    }
    let (media_type, body) = index(&children);
    let digest = super::copy::sha256_digest(&body);
    let tag = crate::registry::build_tag(hash);
    let unchanged = client.digest(repository, &tag).await?.as_deref() == Some(digest.as_str());
    if !unchanged {
        let header = reqwest::header::HeaderValue::from_str(&media_type).expect("a media type is a header value");
        client.put_manifest(repository, &tag, &header, body).await?;
    }
    Ok(Created {
        repository: repository.to_string(),
        tag,
        media_type,
        digest,
        children: children.iter().map(|c| format!("{}@{}", c.arch, c.digest)).collect(),
        unchanged,
    })
}
