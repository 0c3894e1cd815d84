//! What an instance type's name says: its family, its size in vCPUs, its architecture, and
//! the other sizes of its family. Pool lists are made from these, per architecture, so a
//! fleet request never names a type its AMI cannot boot.

use crate::platform::Arch;

/// An instance type's name split into family and size (`c7g.16xlarge` → `c7g`, `16xlarge`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TypeName<'a> {
    pub family: &'a str,
    pub size: &'a str,
}

impl<'a> TypeName<'a> {
    pub fn parse(instance_type: &'a str) -> Option<TypeName<'a>> {
        let (family, size) = instance_type.split_once('.')?;
        (!family.is_empty() && !size.is_empty()).then_some(TypeName { family, size })
    }

    /// vCPUs of the common sizes (`large` 2, `xlarge` 4, `Nxlarge` 4N); `None` for `metal`
    /// and the odd sizes, whose count the name does not say.
    pub fn vcpus(&self) -> Option<u32> {
        match self.size {
            "medium" => Some(1),
            "large" => Some(2),
            "xlarge" => Some(4),
            s => s.strip_suffix("xlarge")?.parse::<u32>().ok().filter(|n| *n > 0).map(|n| n * 4),
        }
    }
}

/// vCPUs of `instance_type`, when its name says (see [`TypeName::vcpus`]).
pub fn vcpus(instance_type: &str) -> Option<u32> {
    TypeName::parse(instance_type)?.vcpus()
}

/// The architecture of an instance type's family. AWS names Graviton families with a `g`
/// among the letters after the generation (`c7g`, `m8g`, `c7gn`, `r6gd`, `im4gn`, `x2gd`),
/// plus `a1`; every other family with a processor letter is x86_64 (`g5` and `g4dn` are
/// GPUs on x86).
pub fn arch_of(instance_type: &str) -> Arch {
    let family = instance_type.split('.').next().unwrap_or_default();
    if family == "a1" {
        return Arch::Arm64;
    }
    let after_generation = family.trim_start_matches(|c: char| !c.is_ascii_digit()).trim_start_matches(|c: char| c.is_ascii_digit());
    let attributes = after_generation.split('-').next().unwrap_or_default();
    if attributes.contains('g') {
        Arch::Arm64
    } else {
        Arch::X86_64
    }
}

/// The sizes (in `Nxlarge` steps from 32 vCPUs up) each family is offered in, for
/// `[cloud] sizes = "at-least"` and `--cpus MIN-MAX`: a family not listed is used only at
/// the sizes configured. Metal sizes are left out (their vCPUs and boot differ).
const FAMILY_SIZES: &[(&str, &[u32])] = &[
    // AMD
    ("m7a", &[8, 12, 16, 24, 32, 48]),
    ("c7a", &[8, 12, 16, 24, 32, 48]),
    ("r7a", &[8, 12, 16, 24, 32, 48]),
    ("m6a", &[8, 12, 16, 24, 32, 48]),
    ("c6a", &[8, 12, 16, 24, 32, 48]),
    ("r6a", &[8, 12, 16, 24, 32, 48]),
    // Intel
    ("m7i", &[8, 12, 16, 24, 48]),
    ("c7i", &[8, 12, 16, 24, 48]),
    ("r7i", &[8, 12, 16, 24, 48]),
    ("m6i", &[8, 12, 16, 24, 32]),
    ("c6i", &[8, 12, 16, 24, 32]),
    ("r6i", &[8, 12, 16, 24, 32]),
    // Graviton
    ("c7g", &[8, 12, 16]),
    ("m7g", &[8, 12, 16]),
    ("r7g", &[8, 12, 16]),
    ("c6g", &[8, 12, 16]),
    ("m6g", &[8, 12, 16]),
    ("r6g", &[8, 12, 16]),
    ("c8g", &[8, 12, 16, 24, 48]),
    ("m8g", &[8, 12, 16, 24, 48]),
    ("r8g", &[8, 12, 16, 24, 48]),
];

/// The types of `family` with between `min` and `max` vCPUs (inclusive), smallest first;
/// empty for a family whose sizes are not known.
pub fn family_sizes(family: &str, min: u32, max: u32) -> Vec<String> {
    FAMILY_SIZES
        .iter()
        .find(|(f, _)| *f == family)
        .map(|(_, sizes)| {
            sizes
                .iter()
                .filter(|n| (min..=max).contains(&(*n * 4)))
                .map(|n| format!("{family}.{n}xlarge"))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_the_name() {
        assert_eq!(vcpus("m7a.16xlarge"), Some(64));
        assert_eq!(vcpus("c6a.xlarge"), Some(4));
        assert_eq!(vcpus("r6a.large"), Some(2));
        assert_eq!(vcpus("c7g.medium"), Some(1));
        assert_eq!(vcpus("m7i.metal-48xl"), None);
        assert_eq!(vcpus("nonsense"), None);
        assert_eq!(vcpus("m7a.0xlarge"), None);
    }

    #[test]
    fn graviton_families_are_arm64_and_the_rest_x86_64() {
        for t in ["c7g.16xlarge", "m7g.16xlarge", "r7g.16xlarge", "c8g.16xlarge", "m8g.48xlarge", "c7gn.16xlarge", "r6gd.8xlarge", "im4gn.16xlarge", "is4gen.8xlarge", "x2gd.16xlarge", "a1.4xlarge", "g5g.16xlarge", "hpc7g.16xlarge"] {
            assert_eq!(arch_of(t), Arch::Arm64, "{t}");
        }
        for t in ["m7a.16xlarge", "c7i.16xlarge", "c7i-flex.8xlarge", "r7iz.16xlarge", "g5.16xlarge", "g4dn.16xlarge", "c6in.16xlarge", "p5.48xlarge", "inf2.24xlarge"] {
            assert_eq!(arch_of(t), Arch::X86_64, "{t}");
        }
    }

    #[test]
    fn a_family_offers_its_known_sizes_within_bounds() {
        assert_eq!(family_sizes("m7a", 64, 192), ["m7a.16xlarge", "m7a.24xlarge", "m7a.32xlarge", "m7a.48xlarge"]);
        assert_eq!(family_sizes("c7g", 64, 192), ["c7g.16xlarge"], "Graviton3 stops at 64 vCPUs");
        assert_eq!(family_sizes("m8g", 48, 96), ["m8g.12xlarge", "m8g.16xlarge", "m8g.24xlarge"]);
        assert!(family_sizes("z1d", 64, 192).is_empty());
    }
}
