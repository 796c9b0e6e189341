//! Names, versions and references, parsed once at the edge.
//!
//! - name: `namespace/name`, each part `[a-z0-9][a-z0-9._-]*`, at most 128 bytes
//! - version: `[A-Za-z0-9][A-Za-z0-9._+-]*`, at most 128 bytes
//! - reference: `ns/name:version`, `ns/name:sha256:<hex>` or `ns/name@sha256:<hex>`
//! - port reference: `<patch reference>@<base reference>`

use std::fmt;
use std::str::FromStr;

use crate::digest::Digest;

/// Longest namespace, name or version, in bytes.
pub const MAX_PART_LEN: usize = 128;

/// Why a name, version or reference was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// A name without exactly one `/`.
    #[error("invalid name {input:?}: expected namespace/name")]
    NotQualified {
        /// The input.
        input: String,
    },
    /// A namespace or name part with a bad character or length.
    #[error(
        "invalid {what} {input:?}: use 1-128 of lowercase letters, digits, '.', '_' or '-', starting with a letter or digit"
    )]
    BadPart {
        /// `namespace` or `name`.
        what: &'static str,
        /// The part.
        input: String,
    },
    /// A bad version string.
    #[error(
        "invalid version {input:?}: use 1-128 of letters, digits, '.', '_', '+' or '-', starting with a letter or digit"
    )]
    BadVersion {
        /// The input.
        input: String,
    },
    /// A reference that is not `ns/name:version` or `ns/name@sha256:...`.
    #[error(
        "invalid reference {input:?}: expected namespace/name:version or namespace/name@sha256:<hex>"
    )]
    BadReference {
        /// The input.
        input: String,
    },
    /// A full reference to a version of another name than the one it must belong to.
    #[error(
        "{input:?} is not a version of {name}: give a version of {name}, as {name}:<version> or just <version>"
    )]
    OtherName {
        /// The input.
        input: String,
        /// The name it must have.
        name: String,
    },
    /// A port reference that is not `patch@base`.
    #[error(
        "invalid port reference {input:?}: expected namespace/patch:version@namespace/base:version"
    )]
    BadPortReference {
        /// The input.
        input: String,
    },
}

fn truncated(s: &str) -> String {
    s.chars().take(200).collect()
}

fn valid_part(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_PART_LEN
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-')
        })
}

/// `namespace/name` of a base or a patch.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name {
    full: String,
    slash: usize,
}

impl Name {
    /// The namespace part.
    pub fn namespace(&self) -> &str {
        &self.full[..self.slash]
    }

    /// The name part (after the `/`).
    pub fn name(&self) -> &str {
        &self.full[self.slash + 1..]
    }

    /// `namespace/name`.
    pub fn as_str(&self) -> &str {
        &self.full
    }
}

impl FromStr for Name {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ns, name) = s.split_once('/').ok_or_else(|| NameError::NotQualified {
            input: truncated(s),
        })?;
        if name.contains('/') {
            return Err(NameError::NotQualified {
                input: truncated(s),
            });
        }
        if !valid_part(ns) {
            return Err(NameError::BadPart {
                what: "namespace",
                input: truncated(ns),
            });
        }
        if !valid_part(name) {
            return Err(NameError::BadPart {
                what: "name",
                input: truncated(name),
            });
        }
        Ok(Self {
            full: s.to_owned(),
            slash: ns.len(),
        })
    }
}

/// A version string (immutable once pushed).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Version(String);

impl Version {
    /// The version string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Version {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= MAX_PART_LEN
            && b[0].is_ascii_alphanumeric()
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'+' | b'-'));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(NameError::BadVersion {
                input: truncated(s),
            })
        }
    }
}

/// A version, or the digest of a version (always accepted where a version is).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum VersionRef {
    /// A named version.
    Version(Version),
    /// A version by its manifest digest.
    Digest(Digest),
}

impl FromStr for VersionRef {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.starts_with("sha256:") {
            s.parse::<Digest>()
                .map(VersionRef::Digest)
                .map_err(|_| NameError::BadVersion {
                    input: truncated(s),
                })
        } else {
            s.parse().map(VersionRef::Version)
        }
    }
}

impl fmt::Display for VersionRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VersionRef::Version(v) => f.write_str(v.as_str()),
            VersionRef::Digest(d) => write!(f, "{d}"),
        }
    }
}

impl VersionRef {
    /// A version of `name`, given as a full reference (`namespace/name:version`,
    /// `namespace/name@sha256:<hex>`) that must name `name`, or as a bare version or
    /// manifest digest (`v1`, `sha256:<hex>`).
    pub fn of(name: &Name, s: &str) -> Result<Self, NameError> {
        if !s.contains('/') {
            return s.parse();
        }
        let r: Reference = s.parse()?;
        if r.name != *name {
            return Err(NameError::OtherName {
                input: truncated(s),
                name: name.to_string(),
            });
        }
        Ok(r.version)
    }
}

/// `namespace/name:version` or `namespace/name@sha256:<hex>`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reference {
    /// The base or patch name.
    pub name: Name,
    /// Which version.
    pub version: VersionRef,
}

impl FromStr for Reference {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || NameError::BadReference {
            input: truncated(s),
        };
        let (name, version) = if let Some((name, digest)) = s.split_once('@') {
            let digest: Digest = digest.parse().map_err(|_| bad())?;
            (name, VersionRef::Digest(digest))
        } else {
            let (name, version) = s.split_once(':').ok_or_else(bad)?;
            (name, version.parse::<VersionRef>()?)
        };
        Ok(Self {
            name: name.parse()?,
            version,
        })
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.version {
            VersionRef::Version(v) => write!(f, "{}:{}", self.name, v),
            VersionRef::Digest(d) => write!(f, "{}@{}", self.name, d),
        }
    }
}

/// `<patch reference>@<base reference>`: a patch carried onto a base.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRef {
    /// The patch version.
    pub patch: Reference,
    /// The target base version.
    pub base: Reference,
}

impl FromStr for PortRef {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || NameError::BadPortReference {
            input: truncated(s),
        };
        // Split at the first '@' that does not start a digest.
        let at = s
            .match_indices('@')
            .map(|(i, _)| i)
            .find(|&i| !s[i + 1..].starts_with("sha256:"))
            .ok_or_else(bad)?;
        Ok(Self {
            patch: s[..at].parse()?,
            base: s[at + 1..].parse()?,
        })
    }
}

impl fmt::Display for PortRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.patch, self.base)
    }
}

/// Any reference a user can pull or ask about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnyRef {
    /// A base or patch version (the registry knows which).
    Version(Reference),
    /// A port.
    Port(PortRef),
}

impl FromStr for AnyRef {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let is_port = s
            .match_indices('@')
            .any(|(i, _)| !s[i + 1..].starts_with("sha256:"));
        if is_port {
            s.parse().map(AnyRef::Port)
        } else {
            s.parse().map(AnyRef::Version)
        }
    }
}

impl fmt::Display for AnyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AnyRef::Version(r) => r.fmt(f),
            AnyRef::Port(p) => p.fmt(f),
        }
    }
}

macro_rules! display_debug_as_str {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", self.as_str())
            }
        }
    )*};
}
display_debug_as_str!(Name, Version);

macro_rules! debug_as_display {
    ($($t:ty),*) => {$(
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", self.to_string())
            }
        }
    )*};
}
debug_as_display!(VersionRef, Reference, PortRef);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_of_takes_full_references_of_the_same_name_and_bare_versions() {
        let n: Name = "acme/llama".parse().unwrap();
        let v = |s: &str| VersionRef::of(&n, s);
        assert_eq!(v("v1").unwrap().to_string(), "v1");
        assert_eq!(v("acme/llama:v1").unwrap().to_string(), "v1");
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(v(&format!("acme/llama@{d}")).unwrap().to_string(), d);
        assert_eq!(v(&d).unwrap().to_string(), d);
        assert!(matches!(
            v("acme/other:v1"),
            Err(NameError::OtherName { .. })
        ));
        assert!(v("acme/llama").is_err());
    }

    #[test]
    fn names() {
        let n: Name = "acme/med-qa".parse().unwrap();
        assert_eq!(n.namespace(), "acme");
        assert_eq!(n.name(), "med-qa");
        for bad in [
            "acme", "Acme/x", "acme/", "/x", "a/b/c", "acme/-x", "acme/x y", "acme/é",
        ] {
            assert!(bad.parse::<Name>().is_err(), "{bad}");
        }
        let long = format!("acme/{}", "a".repeat(129));
        assert!(long.parse::<Name>().is_err());
        let ok = format!("acme/{}", "a".repeat(128));
        assert!(ok.parse::<Name>().is_ok());
    }

    #[test]
    fn references() {
        let r: Reference = "meta/llama:v2".parse().unwrap();
        assert_eq!(r.to_string(), "meta/llama:v2");
        let d = Digest::of(b"x");
        let r: Reference = format!("meta/llama@{d}").parse().unwrap();
        assert_eq!(r.version, VersionRef::Digest(d));
        let r2: Reference = format!("meta/llama:{d}").parse().unwrap();
        assert_eq!(r, r2);
        assert!("meta/llama".parse::<Reference>().is_err());
        assert!("meta/llama:".parse::<Reference>().is_err());
        assert!("meta/llama:v 2".parse::<Reference>().is_err());
        assert!("meta/llama@v2".parse::<Reference>().is_err());
    }

    #[test]
    fn port_references() {
        let p: PortRef = "acme/med-qa:3@meta/llama:v2".parse().unwrap();
        assert_eq!(p.patch.to_string(), "acme/med-qa:3");
        assert_eq!(p.base.to_string(), "meta/llama:v2");
        let d = Digest::of(b"p");
        let p: PortRef = format!("acme/qv@{d}@meta/llama:v2").parse().unwrap();
        assert_eq!(p.patch.version, VersionRef::Digest(d));
        assert!(matches!(
            "acme/qv:1".parse::<AnyRef>().unwrap(),
            AnyRef::Version(_)
        ));
        assert!(matches!(
            format!("acme/qv@{d}").parse::<AnyRef>().unwrap(),
            AnyRef::Version(_)
        ));
        assert!(matches!(
            "acme/qv:1@meta/llama:v2".parse::<AnyRef>().unwrap(),
            AnyRef::Port(_)
        ));
    }

    proptest::proptest! {
        #[test]
        fn parsers_never_panic(s in "\\PC{0,300}") {
            let _ = s.parse::<Name>();
            let _ = s.parse::<Reference>();
            let _ = s.parse::<PortRef>();
            let _ = s.parse::<AnyRef>();
        }

        #[test]
        fn valid_references_round_trip(
            ns in "[a-z0-9][a-z0-9._-]{0,20}",
            name in "[a-z0-9][a-z0-9._-]{0,20}",
            ver in "[A-Za-z0-9][A-Za-z0-9._+-]{0,20}",
        ) {
            let s = format!("{ns}/{name}:{ver}");
            let r: Reference = s.parse().unwrap();
            proptest::prop_assert_eq!(r.to_string(), s);
        }
    }
}
