//! Machine architectures: what a build runs on, how Docker and OCI name it, and the suffix
//! of its per-architecture tags (`cache-<hash>-<arch>`).

use std::fmt;

/// An architecture spotbuild builds for. The AMI decides a machine's architecture, so a
/// fleet request carries exactly one of these.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    /// What spotbuild built on before it knew architectures, and still the default.
    #[default]
    #[serde(rename = "x86_64", alias = "amd64")]
    X86_64,
    #[serde(alias = "aarch64")]
    Arm64,
}

impl Arch {
    pub const ALL: [Arch; 2] = [Arch::X86_64, Arch::Arm64];

    /// This machine's, if spotbuild builds for it.
    pub fn native() -> Option<Arch> {
        Arch::parse(std::env::consts::ARCH)
    }

    /// Reads `x86_64`/`amd64` and `arm64`/`aarch64`.
    pub fn parse(s: &str) -> Option<Arch> {
        match s {
            "x86_64" | "amd64" => Some(Arch::X86_64),
            "arm64" | "aarch64" => Some(Arch::Arm64),
            _ => None,
        }
    }

    /// The Aztec build-system's name, and the suffix of per-arch tags.
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Arm64 => "arm64",
        }
    }

    /// The `architecture` of an OCI platform (and of an image config).
    pub fn oci(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }

    /// `docker build --platform`.
    pub fn docker_platform(self) -> String {
        format!("linux/{}", self.oci())
    }

    /// The tag of this architecture's image of a project built at `hash`.
    pub fn tag(self, hash: &str) -> String {
        format!("cache-{hash}-{}", self.as_str())
    }
}

impl std::str::FromStr for Arch {
    type Err = String;

    fn from_str(s: &str) -> Result<Arch, String> {
        Arch::parse(s).ok_or_else(|| format!("unknown architecture `{s}` (x86_64, amd64, arm64 or aarch64)"))
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_aliases_are_read() {
        for a in Arch::ALL {
            assert_eq!(Arch::parse(a.as_str()), Some(a));
            assert_eq!(Arch::parse(a.oci()), Some(a));
        }
        assert_eq!(Arch::parse("aarch64"), Some(Arch::Arm64));
        assert_eq!(Arch::parse("riscv64"), None);
        assert_eq!(Arch::Arm64.tag("ab12"), "cache-ab12-arm64");
        assert_eq!(Arch::X86_64.docker_platform(), "linux/amd64");
    }
}
