//! Wire messages ↔ the domain types of `patchport-core`.
//!
//! From the wire, every conversion is a `TryFrom` (or [`parse_field`] for a string field)
//! that fails with a [`WireError`] naming the field, down to the element of a list
//! (`merged_files[2].segments[0].blob.digest`): the registry answers it with
//! INVALID_ARGUMENT, a worker treats it as a bad job. Towards the wire it is `From`: a
//! domain value is always a valid message. Conversions of storage records stay in the
//! registry, which knows the store.

use std::convert::Infallible;
use std::fmt;
use std::str::FromStr;

use patchport_core::event::UnknownEventKind;
use patchport_core::layout::{self, ArtifactFile, BlobRange, DeclaredFile, FileRef, LayoutError};
use patchport_core::port::{
    DeltaStats, ModuleDiagnostics, PortDiagnostics, Refusal, ReusedTensor, UnknownRefusalKind,
};
use patchport_core::{DigestError, NameError};

use crate::v1;

/// A message that does not make a domain value: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A required field is absent or empty.
    #[error("{field} is required")]
    Missing {
        /// The field.
        field: String,
    },
    /// Not a `sha256:<64 hex>` digest.
    #[error("{field}: {source}")]
    Digest {
        /// The field.
        field: String,
        /// Why.
        #[source]
        source: DigestError,
    },
    /// Not a name, version or reference.
    #[error("{field}: {source}")]
    Name {
        /// The field.
        field: String,
        /// Why.
        #[source]
        source: NameError,
    },
    /// Not a relative file path a version may hold.
    #[error("{field}: {source}")]
    Path {
        /// The field.
        field: String,
        /// Why.
        #[source]
        source: LayoutError,
    },
    /// Not one of the refusal kinds.
    #[error("{field}: {source}")]
    RefusalKind {
        /// The field.
        field: String,
        /// Why.
        #[source]
        source: UnknownRefusalKind,
    },
    /// Not one of the event types.
    #[error("{field}: {source}")]
    EventKind {
        /// The field.
        field: String,
        /// Why.
        #[source]
        source: UnknownEventKind,
    },
    /// Any other value the field may not have.
    #[error("{field}: {message}")]
    Invalid {
        /// The field.
        field: String,
        /// What is wrong and what to send instead.
        message: String,
    },
}

impl WireError {
    /// A value the field may not have.
    pub fn invalid(field: impl Into<String>, message: impl fmt::Display) -> Self {
        WireError::Invalid {
            field: field.into(),
            message: message.to_string(),
        }
    }

    /// A required field that is absent.
    pub fn missing(field: impl Into<String>) -> Self {
        WireError::Missing {
            field: field.into(),
        }
    }

    /// The field, as a path from the message (`refusals[2].kind`).
    pub fn field(&self) -> &str {
        match self {
            WireError::Missing { field }
            | WireError::Digest { field, .. }
            | WireError::Name { field, .. }
            | WireError::Path { field, .. }
            | WireError::RefusalKind { field, .. }
            | WireError::EventKind { field, .. }
            | WireError::Invalid { field, .. } => field,
        }
    }

    /// The same error one message further out: `kind` within `refusals[2]` is
    /// `refusals[2].kind`.
    pub fn within(mut self, prefix: impl fmt::Display) -> Self {
        let field = match &mut self {
            WireError::Missing { field }
            | WireError::Digest { field, .. }
            | WireError::Name { field, .. }
            | WireError::Path { field, .. }
            | WireError::RefusalKind { field, .. }
            | WireError::EventKind { field, .. }
            | WireError::Invalid { field, .. } => field,
        };
        *field = format!("{prefix}.{field}");
        self
    }
}

/// A domain parse error that a string field can fail with; [`FieldError::at`] names the
/// field.
pub trait FieldError {
    /// The error, for `field`.
    fn at(self, field: &str) -> WireError;
}

macro_rules! field_errors {
    ($($err:ty => $variant:ident),* $(,)?) => {$(
        impl FieldError for $err {
            fn at(self, field: &str) -> WireError {
                WireError::$variant {
                    field: field.to_owned(),
                    source: self,
                }
            }
        }
    )*};
}
field_errors!(
    DigestError => Digest,
    NameError => Name,
    LayoutError => Path,
    UnknownRefusalKind => RefusalKind,
    UnknownEventKind => EventKind,
);

impl FieldError for Infallible {
    fn at(self, _: &str) -> WireError {
        match self {}
    }
}

/// Parses a string field into a domain value (`Digest`, `Reference`, `PortRef`,
/// `EventKind`, ...), naming the field on failure.
pub fn parse_field<T>(field: &str, value: &str) -> Result<T, WireError>
where
    T: FromStr,
    T::Err: FieldError,
{
    value.parse().map_err(|e: T::Err| e.at(field))
}

/// An optional string field: empty (proto3's absent) is `None`.
pub fn parse_optional<T>(field: &str, value: &str) -> Result<Option<T>, WireError>
where
    T: FromStr,
    T::Err: FieldError,
{
    if value.is_empty() {
        Ok(None)
    } else {
        parse_field(field, value).map(Some)
    }
}

/// A repeated string field, parsed item by item (`types[1]`).
pub fn parse_list<T>(field: &str, values: &[String]) -> Result<Vec<T>, WireError>
where
    T: FromStr,
    T::Err: FieldError,
{
    values
        .iter()
        .enumerate()
        .map(|(i, v)| parse_field(&format!("{field}[{i}]"), v))
        .collect()
}

/// A repeated message field, converted item by item (`files[3].digest`).
pub fn try_list<'a, W: 'a, D>(
    field: &str,
    items: impl IntoIterator<Item = &'a W>,
) -> Result<Vec<D>, WireError>
where
    D: TryFrom<&'a W, Error = WireError>,
{
    items
        .into_iter()
        .enumerate()
        .map(|(i, w)| D::try_from(w).map_err(|e| e.within(format_args!("{field}[{i}]"))))
        .collect()
}

/// A message field that must be set.
pub fn required<'a, T>(field: &str, value: Option<&'a T>) -> Result<&'a T, WireError> {
    value.ok_or_else(|| WireError::missing(field))
}

fn path(f: &v1::FileEntry) -> Result<String, WireError> {
    layout::validate_path(&f.path).map_err(|e| e.at("path"))?;
    Ok(f.path.clone())
}

fn segment(r: &BlobRange) -> v1::Segment {
    v1::Segment {
        source: Some(v1::segment::Source::Blob(r.into())),
    }
}

impl From<&FileRef> for v1::FileEntry {
    fn from(f: &FileRef) -> Self {
        v1::FileEntry {
            path: f.path.clone(),
            digest: f.digest.to_string(),
            size: f.size,
            segments: Vec::new(),
        }
    }
}

/// A file stored as one whole blob (a version's file): a composed file is refused.
impl TryFrom<&v1::FileEntry> for FileRef {
    type Error = WireError;

    fn try_from(f: &v1::FileEntry) -> Result<Self, WireError> {
        if !f.segments.is_empty() {
            return Err(WireError::invalid(
                "segments",
                "a version's files are whole blobs, not composed ones: upload the bytes as one blob",
            ));
        }
        Ok(FileRef {
            path: path(f)?,
            digest: parse_field("digest", &f.digest)?,
            size: f.size,
        })
    }
}

impl From<&BlobRange> for v1::BlobRange {
    fn from(r: &BlobRange) -> Self {
        v1::BlobRange {
            digest: r.digest.to_string(),
            offset: r.offset,
            length: r.length,
        }
    }
}

impl TryFrom<&v1::BlobRange> for BlobRange {
    type Error = WireError;

    fn try_from(r: &v1::BlobRange) -> Result<Self, WireError> {
        Ok(BlobRange {
            digest: parse_field("digest", &r.digest)?,
            offset: r.offset,
            length: r.length,
        })
    }
}

impl From<&BlobRange> for v1::Segment {
    fn from(r: &BlobRange) -> Self {
        segment(r)
    }
}

/// A segment that is a blob range (inline bytes are not accepted from clients).
impl TryFrom<&v1::Segment> for BlobRange {
    type Error = WireError;

    fn try_from(s: &v1::Segment) -> Result<Self, WireError> {
        match &s.source {
            Some(v1::segment::Source::Blob(r)) => {
                BlobRange::try_from(r).map_err(|e| e.within("blob"))
            }
            Some(v1::segment::Source::Inline(_)) => Err(WireError::invalid(
                "inline",
                "inline bytes are not accepted: store them as a blob and name a range of it",
            )),
            None => Err(WireError::missing("blob")),
        }
    }
}

impl From<&ArtifactFile> for v1::FileEntry {
    fn from(a: &ArtifactFile) -> Self {
        v1::FileEntry {
            segments: a.segments.iter().map(segment).collect(),
            ..v1::FileEntry::from(&a.file)
        }
    }
}

impl TryFrom<&v1::FileEntry> for ArtifactFile {
    type Error = WireError;

    fn try_from(f: &v1::FileEntry) -> Result<Self, WireError> {
        Ok(ArtifactFile {
            file: FileRef {
                path: path(f)?,
                digest: parse_field("digest", &f.digest)?,
                size: f.size,
            },
            segments: try_list("segments", &f.segments)?,
        })
    }
}

/// A composed file goes without a digest: the registry hashes the composed bytes.
impl From<&DeclaredFile> for v1::FileEntry {
    fn from(d: &DeclaredFile) -> Self {
        match d {
            DeclaredFile::Blob(f) => f.into(),
            DeclaredFile::Composed {
                path,
                size,
                segments,
            } => v1::FileEntry {
                path: path.clone(),
                digest: String::new(),
                size: *size,
                segments: segments.iter().map(segment).collect(),
            },
        }
    }
}

/// A file without segments is a blob (its digest is required); with segments it is
/// composed, and whatever digest it carries is not taken: the composed bytes are hashed
/// by whoever verifies them.
impl TryFrom<&v1::FileEntry> for DeclaredFile {
    type Error = WireError;

    fn try_from(f: &v1::FileEntry) -> Result<Self, WireError> {
        if f.segments.is_empty() {
            return FileRef::try_from(f).map(DeclaredFile::Blob);
        }
        Ok(DeclaredFile::Composed {
            path: path(f)?,
            size: f.size,
            segments: try_list("segments", &f.segments)?,
        })
    }
}

impl From<&Refusal> for v1::Refusal {
    fn from(r: &Refusal) -> Self {
        v1::Refusal {
            kind: r.kind.as_str().to_owned(),
            message: r.message.clone(),
            subject: r.subject.clone(),
        }
    }
}

impl TryFrom<&v1::Refusal> for Refusal {
    type Error = WireError;

    fn try_from(r: &v1::Refusal) -> Result<Self, WireError> {
        Ok(Refusal {
            kind: parse_field("kind", &r.kind)?,
            subject: r.subject.clone(),
            message: r.message.clone(),
        })
    }
}

impl From<&ModuleDiagnostics> for v1::ModuleDiagnostics {
    fn from(d: &ModuleDiagnostics) -> Self {
        v1::ModuleDiagnostics {
            module: d.module.clone(),
            base_drift: d.base_drift,
            patch_size: d.patch_size,
            drift_to_patch: d.drift_to_patch,
            cosine: d.cosine,
            unchanged: d.unchanged,
            sums: d.sums.as_ref().map(|s| v1::DeltaStats {
                delta_sq: s.delta_sq,
                drift_sq: s.drift_sq,
                old_sq: s.old_sq,
                dot: s.dot,
            }),
        }
    }
}

impl From<&v1::ModuleDiagnostics> for ModuleDiagnostics {
    fn from(d: &v1::ModuleDiagnostics) -> Self {
        ModuleDiagnostics {
            module: d.module.clone(),
            base_drift: d.base_drift,
            patch_size: d.patch_size,
            drift_to_patch: d.drift_to_patch,
            cosine: d.cosine,
            unchanged: d.unchanged,
            sums: d.sums.as_ref().map(|s| DeltaStats {
                delta_sq: s.delta_sq,
                drift_sq: s.drift_sq,
                old_sq: s.old_sq,
                dot: s.dot,
            }),
        }
    }
}

impl From<&ReusedTensor> for v1::ReusedTensor {
    fn from(r: &ReusedTensor) -> Self {
        v1::ReusedTensor {
            tensor: r.tensor.clone(),
            digest: r.digest.to_string(),
            size: r.size,
            diagnostics: Some((&r.diagnostics).into()),
        }
    }
}

/// A reused tensor must carry its module's diagnostics with their sums: without them the
/// port's total could not be the one a full port computes.
impl TryFrom<&v1::ReusedTensor> for ReusedTensor {
    type Error = WireError;

    fn try_from(r: &v1::ReusedTensor) -> Result<Self, WireError> {
        let diagnostics: ModuleDiagnostics =
            required("diagnostics", r.diagnostics.as_ref())?.into();
        if diagnostics.sums.is_none() {
            return Err(WireError::missing("diagnostics.sums"));
        }
        Ok(ReusedTensor {
            tensor: r.tensor.clone(),
            digest: parse_field("digest", &r.digest)?,
            size: r.size,
            diagnostics,
        })
    }
}

/// With the drift risk computed from the numbers ([`PortDiagnostics::risk`]).
impl From<&PortDiagnostics> for v1::PortDiagnostics {
    fn from(d: &PortDiagnostics) -> Self {
        v1::PortDiagnostics {
            modules: d.modules.iter().map(Into::into).collect(),
            total: Some((&d.total).into()),
            risk: d.risk(),
            high_risk: d.high_risk(),
        }
    }
}

/// The wire's `risk` is not taken: it is always recomputed from the numbers. An absent
/// total is all zeros.
impl From<&v1::PortDiagnostics> for PortDiagnostics {
    fn from(d: &v1::PortDiagnostics) -> Self {
        PortDiagnostics {
            modules: d.modules.iter().map(Into::into).collect(),
            total: d.total.as_ref().map(Into::into).unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use patchport_core::event::EventKind;
    use patchport_core::port::RefusalKind;
    use patchport_core::{Digest, PortRef, Reference};

    use super::*;

    fn range(seed: &[u8], offset: u64, length: u64) -> BlobRange {
        BlobRange {
            digest: Digest::of(seed),
            offset,
            length,
        }
    }

    fn file(path: &str) -> FileRef {
        FileRef {
            path: path.to_owned(),
            digest: Digest::of(path.as_bytes()),
            size: 42,
        }
    }

    fn round_trip<D>(d: &D) -> D
    where
        for<'a> v1::FileEntry: From<&'a D>,
        for<'a> D: TryFrom<&'a v1::FileEntry, Error = WireError>,
    {
        D::try_from(&v1::FileEntry::from(d)).unwrap()
    }

    #[test]
    fn files_round_trip() {
        let f = file("model-00001-of-00002.safetensors");
        assert_eq!(round_trip(&f), f);
        let a = ArtifactFile {
            file: file("model.safetensors"),
            segments: vec![range(b"header", 0, 8), range(b"base", 8, 1024)],
        };
        assert_eq!(round_trip(&a), a);
        let whole = ArtifactFile {
            file: file("config.json"),
            segments: Vec::new(),
        };
        assert_eq!(round_trip(&whole), whole);
        for d in [
            DeclaredFile::Blob(file("adapter_config.json")),
            DeclaredFile::Composed {
                path: "model.safetensors".to_owned(),
                size: 1032,
                segments: vec![range(b"header", 0, 8), range(b"merged", 0, 1024)],
            },
        ] {
            assert_eq!(round_trip(&d), d);
        }
    }

    #[test]
    fn a_composed_file_goes_without_a_digest_and_one_sent_is_not_taken() {
        let composed = DeclaredFile::Composed {
            path: "model.safetensors".to_owned(),
            size: 9,
            segments: vec![range(b"h", 0, 9)],
        };
        let mut wire = v1::FileEntry::from(&composed);
        assert_eq!(wire.digest, "");
        wire.digest = Digest::of(b"a claim").to_string();
        assert_eq!(DeclaredFile::try_from(&wire), Ok(composed));
    }

    #[test]
    fn refusals_and_diagnostics_round_trip() {
        for kind in RefusalKind::ALL {
            let r = Refusal::new(kind, "model.layers.0.q_proj", "a sentence".to_owned());
            assert_eq!(Refusal::try_from(&v1::Refusal::from(&r)), Ok(r));
        }
        let module = |name: &str, x: f64| ModuleDiagnostics {
            module: name.to_owned(),
            base_drift: x,
            patch_size: 2.0 * x,
            drift_to_patch: 0.5,
            cosine: -0.25,
            unchanged: x == 0.0,
            sums: (x > 0.0).then_some(DeltaStats {
                delta_sq: 4.0 * x,
                drift_sq: x,
                old_sq: 1.0,
                dot: -x,
            }),
        };
        let d = PortDiagnostics {
            modules: vec![module("a.q_proj", 0.1), module("a.v_proj", 0.0)],
            total: module("total", 0.1),
        };
        let wire = v1::PortDiagnostics::from(&d);
        assert_eq!(wire.risk, d.risk());
        assert_eq!(wire.high_risk, d.high_risk());
        assert_eq!(PortDiagnostics::from(&wire), d);
        assert_eq!(
            PortDiagnostics::from(&v1::PortDiagnostics::default()),
            PortDiagnostics::default()
        );
    }

    #[test]
    fn a_reused_tensor_round_trips_and_needs_its_sums() {
        let r = ReusedTensor {
            tensor: "m.q_proj.weight".to_owned(),
            digest: Digest::of(b"merged"),
            size: 6,
            diagnostics: ModuleDiagnostics {
                module: "m.q_proj".to_owned(),
                sums: Some(DeltaStats {
                    delta_sq: 1.0,
                    ..DeltaStats::default()
                }),
                ..ModuleDiagnostics::default()
            },
        };
        let wire = v1::ReusedTensor::from(&r);
        assert_eq!(ReusedTensor::try_from(&wire), Ok(r));
        let mut bare = wire.clone();
        bare.diagnostics.as_mut().unwrap().sums = None;
        assert_eq!(
            ReusedTensor::try_from(&bare).unwrap_err().field(),
            "diagnostics.sums"
        );
    }

    #[test]
    fn a_bad_digest_names_its_field_down_to_the_list_element() {
        let mut wire = v1::FileEntry::from(&DeclaredFile::Composed {
            path: "model.safetensors".to_owned(),
            size: 3,
            segments: vec![range(b"a", 0, 1), range(b"b", 0, 2)],
        });
        let Some(v1::segment::Source::Blob(r)) = &mut wire.segments[1].source else {
            unreachable!()
        };
        r.digest = "sha256:nope".to_owned();
        let files = [v1::FileEntry::from(&file("config.json")), wire];
        let err = try_list::<_, DeclaredFile>("merged_files", &files).unwrap_err();
        assert!(matches!(err, WireError::Digest { .. }), "{err:?}");
        assert_eq!(err.field(), "merged_files[1].segments[1].blob.digest");
        assert!(
            err.to_string().starts_with(
                "merged_files[1].segments[1].blob.digest: invalid digest \"sha256:nope\""
            ),
            "{err}"
        );

        let mut blob = v1::FileEntry::from(&file("config.json"));
        blob.digest = String::new();
        let err = FileRef::try_from(&blob).unwrap_err();
        assert_eq!(err.field(), "digest");
        assert!(matches!(err, WireError::Digest { .. }));
    }

    #[test]
    fn an_unknown_refusal_kind_is_a_typed_error_naming_the_field() {
        let refusals = [
            v1::Refusal::from(&Refusal::new(RefusalKind::Dora, "", String::new())),
            v1::Refusal {
                kind: "lossy".to_owned(),
                message: String::new(),
                subject: String::new(),
            },
        ];
        let err = try_list::<_, Refusal>("refusals", &refusals).unwrap_err();
        assert_eq!(
            err,
            WireError::RefusalKind {
                field: "refusals[1].kind".to_owned(),
                source: UnknownRefusalKind("lossy".to_owned()),
            }
        );
        assert!(
            err.to_string()
                .starts_with("refusals[1].kind: unknown refusal kind \"lossy\"")
        );
    }

    #[test]
    fn files_that_are_not_what_the_field_holds_are_refused() {
        // A version's file cannot be composed.
        let composed = v1::FileEntry::from(&ArtifactFile {
            file: file("model.safetensors"),
            segments: vec![range(b"a", 0, 1)],
        });
        assert_eq!(
            FileRef::try_from(&composed).unwrap_err().field(),
            "segments"
        );
        // Paths that escape the version.
        let mut escape = v1::FileEntry::from(&file("config.json"));
        escape.path = "../etc/passwd".to_owned();
        let err = FileRef::try_from(&escape).unwrap_err();
        assert!(matches!(err, WireError::Path { .. }) && err.field() == "path");
        assert!(DeclaredFile::try_from(&escape).is_err());
        // Inline bytes and empty segments.
        let mut inline = composed.clone();
        inline.segments[0].source = Some(v1::segment::Source::Inline(b"x"[..].into()));
        let err = DeclaredFile::try_from(&inline).unwrap_err();
        assert_eq!(err.field(), "segments[0].inline");
        inline.segments[0].source = None;
        let err = ArtifactFile::try_from(&inline).unwrap_err();
        assert_eq!(err, WireError::missing("segments[0].blob"));
    }

    #[test]
    fn string_fields_parse_into_domain_values_or_name_the_field() {
        let r: Reference = parse_field("patch", "acme/qv:1").unwrap();
        assert_eq!(r.to_string(), "acme/qv:1");
        let p: PortRef = parse_field("reference", "acme/qv:1@meta/llama:v2").unwrap();
        assert_eq!(p.to_string(), "acme/qv:1@meta/llama:v2");
        let err = parse_field::<Reference>("base", "acme/llama").unwrap_err();
        assert!(matches!(err, WireError::Name { .. }) && err.field() == "base");
        assert!(
            err.to_string().starts_with("base: invalid reference"),
            "{err}"
        );
        assert_eq!(parse_optional::<Digest>("eval_digest", ""), Ok(None));
        let d = Digest::of(b"x");
        assert_eq!(
            parse_optional::<Digest>("eval_digest", &d.to_string()),
            Ok(Some(d))
        );
        let types = ["port.completed".to_owned(), "port.done".to_owned()];
        let err = parse_list::<EventKind>("types", &types).unwrap_err();
        assert!(matches!(err, WireError::EventKind { .. }) && err.field() == "types[1]");
        assert_eq!(
            parse_list::<EventKind>("types", &types[..1]),
            Ok(vec![EventKind::PortCompleted])
        );
        assert_eq!(
            required::<v1::PortDiagnostics>("diagnostics", None),
            Err(WireError::missing("diagnostics"))
        );
        assert_eq!(
            WireError::invalid("priority", "1000 is out of range").to_string(),
            "priority: 1000 is out of range"
        );
    }
}
