//! patchport's signatures: ECDSA P-256 keys in PEM, DSSE envelopes of in-toto
//! statements, and the two documents the registry signs.
//!
//! - **Model signatures** (`model.sig`) in the format of OpenSSF Model Signing (the
//!   `model_signing` Python package, key-based): a Sigstore bundle
//!   (`application/vnd.dev.sigstore.bundle.v0.3+json`) whose verification material is
//!   a public key *hint* (the sha256 of the key's SPKI PEM) and whose DSSE envelope
//!   carries an in-toto statement (`https://in-toto.io/Statement/v1`) with the predicate
//!   `https://model_signing/signature/v1.0`: `serialization` (method `files`, sha256, no
//!   symlinks, the ignored paths) and one `resources` entry per file (name, algorithm,
//!   hex digest), sorted by path; the one subject is the model name with the sha256 of
//!   the resources' raw digests concatenated in that order. `model_signing verify key`
//!   verifies it with the public key PEM.
//! - **Port provenance** (`provenance.json`): a DSSE envelope of an in-toto statement
//!   with the predicate [`PORT_PROVENANCE_PREDICATE`] ([`PortProvenance`]): the output
//!   files as subjects, the old base, new base and patch as inputs, the method and its
//!   version, the worker and its device, the diagnostics and the evaluation verdict.
//!
//! Everything is signed from digests the caller already has (a manifest's file digests):
//! nothing here reads a model file. Signatures are deterministic (RFC 6979), DER-encoded
//! as the Python verifier expects.
//!
//! Architecture invariant: pure functions over bytes and digests: no I/O, no network, no
//! patchport dependency.

use std::collections::BTreeMap;
use std::fmt;

use base64::engine::general_purpose::STANDARD as B64;
use p256::ecdsa::signature::{Signer as _, Verifier as _};
use p256::pkcs8::{DecodePrivateKey as _, DecodePublicKey as _, EncodePrivateKey as _};
use p256::pkcs8::{EncodePublicKey as _, LineEnding};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// The Sigstore bundle media type `model_signing` writes and checks.
pub const BUNDLE_MEDIA_TYPE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
/// The DSSE payload type of an in-toto statement.
pub const IN_TOTO_PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
/// The in-toto statement type.
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
/// OpenSSF Model Signing's predicate type.
pub const MODEL_SIGNATURE_PREDICATE: &str = "https://model_signing/signature/v1.0";
/// patchport's port provenance predicate type.
pub const PORT_PROVENANCE_PREDICATE: &str = "https://patchport.dev/port-provenance/v1";
/// The signature file written beside a pulled model.
pub const SIGNATURE_FILE: &str = "model.sig";
/// The provenance file written beside a pulled port (it is one of the files `model.sig`
/// signs).
pub const PROVENANCE_FILE: &str = "provenance.json";
/// Paths `model.sig` tells verifiers to skip: itself, and git's files (as
/// `model_signing sign` records them).
pub const IGNORED_PATHS: [&str; 5] = [
    SIGNATURE_FILE,
    ".git",
    ".github",
    ".gitattributes",
    ".gitignore",
];

/// A signing or verification failure.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    /// A key that does not parse.
    #[error("invalid {what}: {message}")]
    Key {
        /// `private key PEM`, `public key PEM`.
        what: &'static str,
        /// Why.
        message: String,
    },
    /// A document that is not what it claims to be.
    #[error("malformed {what}: {message}")]
    Malformed {
        /// `model signature`, `provenance`.
        what: &'static str,
        /// What is wrong.
        message: String,
    },
    /// Signed by a key that is not trusted.
    #[error("{what} is signed by key {hint}, which is not among the trusted public keys")]
    Untrusted {
        /// `model signature`, `provenance`.
        what: &'static str,
        /// The signing key's hint.
        hint: String,
    },
    /// The signature does not verify.
    #[error("{what}: the signature does not verify with any trusted public key")]
    BadSignature {
        /// `model signature`, `provenance`.
        what: &'static str,
    },
    /// Bad input to sign (a file digest, a duplicate path).
    #[error("cannot sign: {message}")]
    Input {
        /// Why.
        message: String,
    },
}

fn malformed(what: &'static str, message: impl fmt::Display) -> SigningError {
    SigningError::Malformed {
        what,
        message: message.to_string(),
    }
}

/// A public key: ECDSA P-256, as SPKI PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    key: p256::ecdsa::VerifyingKey,
    pem: String,
    hint: String,
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublicKey")
            .field("hint", &self.hint)
            .finish()
    }
}

impl PublicKey {
    fn new(key: p256::ecdsa::VerifyingKey) -> Self {
        // SPKI PEM with LF line endings and 64-column lines: byte-identical to what
        // Python's `cryptography` writes, so the hint (its sha256) matches model_signing's.
        let pem = key
            .to_public_key_pem(LineEnding::LF)
            .expect("a valid P-256 key always encodes");
        let hint = hex::encode(Sha256::digest(pem.as_bytes()));
        Self { key, pem, hint }
    }

    /// Parses one `-----BEGIN PUBLIC KEY-----` block (P-256 only).
    pub fn from_pem(pem: &str) -> Result<Self, SigningError> {
        let key = p256::ecdsa::VerifyingKey::from_public_key_pem(pem.trim()).map_err(|e| {
            SigningError::Key {
                what: "public key PEM",
                message: format!("{e} (expected an ECDSA P-256 `BEGIN PUBLIC KEY` block)"),
            }
        })?;
        Ok(Self::new(key))
    }

    /// Every `BEGIN PUBLIC KEY` block of a text (a file of trusted keys); at least one.
    pub fn parse_all(text: &str) -> Result<Vec<Self>, SigningError> {
        const END: &str = "-----END PUBLIC KEY-----";
        let mut keys = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("-----BEGIN PUBLIC KEY-----") {
            let Some(end) = rest[start..].find(END) else {
                break;
            };
            let block = &rest[start..start + end + END.len()];
            keys.push(Self::from_pem(block)?);
            rest = &rest[start + end + END.len()..];
        }
        if keys.is_empty() {
            return Err(SigningError::Key {
                what: "public key PEM",
                message: "no `-----BEGIN PUBLIC KEY-----` block found".to_owned(),
            });
        }
        Ok(keys)
    }

    /// The SPKI PEM (LF line endings, trailing newline).
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// The key's hint: lowercase hex sha256 of [`pem`](Self::pem), as model_signing
    /// records it in a bundle's `verificationMaterial.publicKey.hint`.
    pub fn hint(&self) -> &str {
        &self.hint
    }

    fn verify(&self, message: &[u8], der: &[u8]) -> bool {
        match p256::ecdsa::DerSignature::from_bytes(der) {
            Ok(sig) => self.key.verify(message, &sig).is_ok(),
            Err(_) => false,
        }
    }
}

/// An ECDSA P-256 signing key.
pub struct SigningKey {
    key: p256::ecdsa::SigningKey,
    public: PublicKey,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("public", &self.public.hint)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    fn new(key: p256::ecdsa::SigningKey) -> Self {
        let public = PublicKey::new(*key.verifying_key());
        Self { key, public }
    }

    /// A new random key (from the operating system's CSPRNG).
    pub fn generate() -> Self {
        use p256::elliptic_curve::Generate as _;
        Self::new(p256::ecdsa::SigningKey::generate())
    }

    /// Parses a private key PEM: PKCS#8 (`BEGIN PRIVATE KEY`, what `openssl genpkey`
    /// writes) or SEC1 (`BEGIN EC PRIVATE KEY`, `openssl ecparam -genkey`); P-256 only.
    pub fn from_pem(pem: &str) -> Result<Self, SigningError> {
        let pem = pem.trim();
        let parsed = if pem.contains("BEGIN EC PRIVATE KEY") {
            // `openssl ecparam -genkey` may put an `EC PARAMETERS` block first.
            let start = pem.find("-----BEGIN EC PRIVATE KEY-----").unwrap_or(0);
            p256::SecretKey::from_sec1_pem(&pem[start..])
                .map(p256::ecdsa::SigningKey::from)
                .map_err(|e| e.to_string())
        } else {
            p256::ecdsa::SigningKey::from_pkcs8_pem(pem).map_err(|e| e.to_string())
        };
        parsed.map(Self::new).map_err(|message| SigningError::Key {
            what: "private key PEM",
            message: format!(
                "{message} (expected an ECDSA P-256 key, PKCS#8 `BEGIN PRIVATE KEY` or SEC1 `BEGIN EC PRIVATE KEY`)"
            ),
        })
    }

    /// The key as PKCS#8 PEM (to store; keep it secret).
    pub fn to_pem(&self) -> String {
        self.key
            .to_pkcs8_pem(LineEnding::LF)
            .expect("a valid P-256 key always encodes")
            .to_string()
    }

    /// The public half.
    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// Signs `payload` as a DSSE envelope (the signature covers the PAE encoding).
    pub fn sign_envelope(&self, payload_type: &str, payload: Vec<u8>) -> Envelope {
        let sig: p256::ecdsa::DerSignature = self.key.sign(&pae(payload_type, &payload));
        Envelope {
            payload,
            payload_type: payload_type.to_owned(),
            signatures: vec![EnvelopeSignature {
                sig: sig.as_bytes().to_vec(),
                keyid: self.public.hint.clone(),
            }],
        }
    }
}

/// DSSE's pre-authentication encoding:
/// `"DSSEv1" SP len(type) SP type SP len(payload) SP payload`.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {} {} ",
        payload_type.len(),
        payload_type,
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

mod b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::B64.encode(v))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        super::B64
            .decode(s.as_bytes())
            .map_err(|e| serde::de::Error::custom(format!("invalid base64: {e}")))
    }
}

/// A DSSE envelope (JSON field names as in the DSSE spec and Sigstore bundles).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    /// The signed bytes (base64 in JSON).
    #[serde(with = "b64")]
    pub payload: Vec<u8>,
    /// What the payload is.
    pub payload_type: String,
    /// One per signer.
    pub signatures: Vec<EnvelopeSignature>,
}

/// One signature of an envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvelopeSignature {
    /// DER-encoded ECDSA signature over the PAE (base64 in JSON).
    #[serde(with = "b64")]
    pub sig: Vec<u8>,
    /// The signing key's hint (empty in bundles made by model_signing itself).
    #[serde(default)]
    pub keyid: String,
}

impl Envelope {
    /// Checks a signature with one of `trusted`; returns the key that verified it.
    pub fn verify<'k>(
        &self,
        trusted: &'k [PublicKey],
        what: &'static str,
    ) -> Result<&'k PublicKey, SigningError> {
        let message = pae(&self.payload_type, &self.payload);
        for s in &self.signatures {
            if let Some(k) = trusted.iter().find(|k| k.verify(&message, &s.sig)) {
                return Ok(k);
            }
        }
        if let Some(s) = self.signatures.iter().find(|s| !s.keyid.is_empty())
            && !trusted.iter().any(|k| k.hint == s.keyid)
        {
            return Err(SigningError::Untrusted {
                what,
                hint: s.keyid.clone(),
            });
        }
        Err(SigningError::BadSignature { what })
    }
}

/// An in-toto resource descriptor (name, digests by algorithm, optional URI).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceDescriptor {
    /// A file path, a model name, or a role (`patch`, `old_base`, `new_base`).
    pub name: String,
    /// A reference, for inputs (`patchport:acme/qv:1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// `{"sha256": "<hex>"}`.
    pub digest: BTreeMap<String, String>,
}

/// An in-toto statement v1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Statement<P> {
    /// Always [`STATEMENT_TYPE`].
    #[serde(rename = "_type")]
    pub type_: String,
    /// What the statement is about.
    pub subject: Vec<ResourceDescriptor>,
    /// The predicate's type URI.
    pub predicate_type: String,
    /// The predicate.
    pub predicate: P,
}

/// One file of a model: its path (relative, `/`-separated) and sha256.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FileDigest {
    /// Relative path with `/` separators.
    pub path: String,
    /// Lowercase hex sha256.
    pub sha256: String,
}

impl FileDigest {
    /// `digest` as `sha256:<hex>` (patchport's form) or bare lowercase hex.
    pub fn new(path: impl Into<String>, digest: &str) -> Result<Self, SigningError> {
        let path = path.into();
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(SigningError::Input {
                message: format!("{path}: {digest:?} is not a sha256 digest"),
            });
        }
        if path.is_empty() || path.starts_with('/') || path.split('/').any(|c| c == "..") {
            return Err(SigningError::Input {
                message: format!("{path:?} is not a relative file path"),
            });
        }
        Ok(Self {
            path,
            sha256: hex.to_owned(),
        })
    }

    /// The sha256 of a byte string (a provenance document).
    pub fn of(path: impl Into<String>, bytes: &[u8]) -> Self {
        Self {
            path: path.into(),
            sha256: hex::encode(Sha256::digest(bytes)),
        }
    }

    fn raw(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        // Validated by `new`/`of` or by `parse_resources`.
        let _ = hex::decode_to_slice(&self.sha256, &mut out);
        out
    }
}

/// The order model_signing gives resources: by path components (as Python's
/// `PurePosixPath` compares), so `a/b` sorts before `a.txt`.
fn sort_files(files: &mut [FileDigest]) {
    files.sort_by(|a, b| a.path.split('/').cmp(b.path.split('/')));
}

/// model_signing's `serialization` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Serialization {
    /// `files`: one resource per file.
    pub method: String,
    /// `sha256`.
    pub hash_type: String,
    /// `false`: a symlink in the model fails verification.
    pub allow_symlinks: bool,
    /// Paths (relative to the model) verifiers skip.
    #[serde(default)]
    pub ignore_paths: Vec<String>,
}

/// One resource of a model signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resource {
    /// The file path.
    pub name: String,
    /// `sha256`.
    pub algorithm: String,
    /// Hex digest.
    pub digest: String,
}

/// The `https://model_signing/signature/v1.0` predicate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelPredicate {
    /// How the model was serialized into resources.
    pub serialization: Serialization,
    /// One per file, sorted by path.
    pub resources: Vec<Resource>,
}

/// A Sigstore bundle v0.3 with a public-key hint and a DSSE envelope (the shape
/// model_signing's key-based signer writes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Bundle {
    /// [`BUNDLE_MEDIA_TYPE`].
    pub media_type: String,
    /// Which key signed it.
    pub verification_material: VerificationMaterial,
    /// The signed statement.
    pub dsse_envelope: Envelope,
}

/// A bundle's verification material: a public key identifier, no transparency log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VerificationMaterial {
    /// The key's hint.
    pub public_key: PublicKeyIdentifier,
    /// Always empty (key-based signing logs nothing).
    #[serde(default)]
    pub tlog_entries: Vec<serde_json::Value>,
}

/// `{"hint": "<hex sha256 of the SPKI PEM>"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicKeyIdentifier {
    /// The hint (may be absent in old bundles).
    #[serde(default)]
    pub hint: Option<String>,
}

/// A verified model signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedModel {
    /// The statement's subject name (informative).
    pub name: String,
    /// Every signed file, in the signature's order.
    pub files: Vec<FileDigest>,
    /// Paths verifiers skip.
    pub ignore_paths: Vec<String>,
    /// The key that verified it.
    pub key_hint: String,
}

/// Signs a model (OpenSSF Model Signing, key-based) from the digests of its files and
/// returns `model.sig`'s JSON. `name` is informative (model_signing uses the directory
/// name). Fails on a duplicate path, a path the signature would tell verifiers to skip,
/// or a digest that is not sha256.
pub fn sign_model(
    key: &SigningKey,
    name: &str,
    files: &[FileDigest],
) -> Result<String, SigningError> {
    let mut files = files.to_vec();
    sort_files(&mut files);
    for w in files.windows(2) {
        if w[0].path == w[1].path {
            return Err(SigningError::Input {
                message: format!("{} appears twice", w[0].path),
            });
        }
    }
    if let Some(f) = files.iter().find(|f| is_ignored(&f.path, &IGNORED_PATHS)) {
        return Err(SigningError::Input {
            message: format!(
                "{} is a path model_signing skips; it cannot be part of a signed model",
                f.path
            ),
        });
    }
    let statement = Statement {
        type_: STATEMENT_TYPE.to_owned(),
        subject: vec![ResourceDescriptor {
            name: name.to_owned(),
            uri: None,
            digest: BTreeMap::from([("sha256".to_owned(), root_digest(&files))]),
        }],
        predicate_type: MODEL_SIGNATURE_PREDICATE.to_owned(),
        predicate: ModelPredicate {
            serialization: Serialization {
                method: "files".to_owned(),
                hash_type: "sha256".to_owned(),
                allow_symlinks: false,
                ignore_paths: IGNORED_PATHS.iter().map(|p| (*p).to_owned()).collect(),
            },
            resources: files
                .iter()
                .map(|f| Resource {
                    name: f.path.clone(),
                    algorithm: "sha256".to_owned(),
                    digest: f.sha256.clone(),
                })
                .collect(),
        },
    };
    let payload = serde_json::to_vec_pretty(&statement).map_err(|e| SigningError::Input {
        message: e.to_string(),
    })?;
    let bundle = Bundle {
        media_type: BUNDLE_MEDIA_TYPE.to_owned(),
        verification_material: VerificationMaterial {
            public_key: PublicKeyIdentifier {
                hint: Some(key.public.hint.clone()),
            },
            tlog_entries: Vec::new(),
        },
        dsse_envelope: key.sign_envelope(IN_TOTO_PAYLOAD_TYPE, payload),
    };
    serde_json::to_string_pretty(&bundle).map_err(|e| SigningError::Input {
        message: e.to_string(),
    })
}

/// Whether `path` is, or is under, one of `ignored`.
pub fn is_ignored(path: &str, ignored: &[impl AsRef<str>]) -> bool {
    ignored.iter().any(|i| {
        let i = i.as_ref().trim_end_matches('/');
        path == i || path.strip_prefix(i).is_some_and(|r| r.starts_with('/'))
    })
}

/// sha256 over the raw digests in order (the model signature's subject digest).
fn root_digest(files: &[FileDigest]) -> String {
    let mut h = Sha256::new();
    for f in files {
        h.update(f.raw());
    }
    hex::encode(h.finalize())
}

const MODEL: &str = "model signature";
const PROVENANCE: &str = "provenance";

/// Verifies `model.sig`'s JSON with the trusted keys and returns what it signs (the
/// caller compares the files). Checks what model_signing checks: the media type, the
/// key hint, the signature over the PAE, the payload and statement types, the
/// predicate type and the subject digest against the resources.
pub fn verify_model(bundle_json: &str, trusted: &[PublicKey]) -> Result<SignedModel, SigningError> {
    let bundle: Bundle = serde_json::from_str(bundle_json).map_err(|e| malformed(MODEL, e))?;
    if bundle.media_type != BUNDLE_MEDIA_TYPE {
        return Err(malformed(
            MODEL,
            format!(
                "media type {:?}, expected {BUNDLE_MEDIA_TYPE}",
                bundle.media_type
            ),
        ));
    }
    let candidates: Vec<PublicKey> = match &bundle.verification_material.public_key.hint {
        Some(hint) => {
            let k: Vec<_> = trusted
                .iter()
                .filter(|k| &k.hint == hint)
                .cloned()
                .collect();
            if k.is_empty() {
                return Err(SigningError::Untrusted {
                    what: MODEL,
                    hint: hint.clone(),
                });
            }
            k
        }
        None => trusted.to_vec(),
    };
    let key = bundle.dsse_envelope.verify(&candidates, MODEL)?;
    let statement: Statement<ModelPredicate> = statement(&bundle.dsse_envelope, MODEL)?;
    if statement.predicate_type != MODEL_SIGNATURE_PREDICATE {
        return Err(malformed(
            MODEL,
            format!(
                "predicate type {:?}, expected {MODEL_SIGNATURE_PREDICATE}",
                statement.predicate_type
            ),
        ));
    }
    let [subject] = statement.subject.as_slice() else {
        return Err(malformed(MODEL, "expected exactly one subject"));
    };
    let p = &statement.predicate;
    if p.serialization.method != "files" || p.serialization.hash_type != "sha256" {
        return Err(malformed(
            MODEL,
            format!(
                "serialization {}/{}, only files/sha256 is supported",
                p.serialization.method, p.serialization.hash_type
            ),
        ));
    }
    let files = p
        .resources
        .iter()
        .map(|r| {
            if r.algorithm != "sha256" {
                return Err(malformed(
                    MODEL,
                    format!("{}: algorithm {:?}", r.name, r.algorithm),
                ));
            }
            FileDigest::new(r.name.clone(), &r.digest).map_err(|e| malformed(MODEL, e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if subject.digest.get("sha256") != Some(&root_digest(&files)) {
        return Err(malformed(
            MODEL,
            "the subject digest does not match the resources (the manifest is inconsistent)",
        ));
    }
    Ok(SignedModel {
        name: subject.name.clone(),
        files,
        ignore_paths: p.serialization.ignore_paths.clone(),
        key_hint: key.hint.clone(),
    })
}

fn statement<P: serde::de::DeserializeOwned>(
    envelope: &Envelope,
    what: &'static str,
) -> Result<Statement<P>, SigningError> {
    if envelope.payload_type != IN_TOTO_PAYLOAD_TYPE {
        return Err(malformed(
            what,
            format!(
                "payload type {:?}, expected {IN_TOTO_PAYLOAD_TYPE}",
                envelope.payload_type
            ),
        ));
    }
    let s: Statement<P> =
        serde_json::from_slice(&envelope.payload).map_err(|e| malformed(what, e))?;
    if s.type_ != STATEMENT_TYPE {
        return Err(malformed(
            what,
            format!("statement type {:?}, expected {STATEMENT_TYPE}", s.type_),
        ));
    }
    Ok(s)
}

/// A named, versioned thing: the port method.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Method {
    /// `portllm`.
    pub name: String,
    /// The engine's method version.
    pub version: String,
}

/// Who ran the port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// The worker id it leased the job with (empty when not known).
    pub id: String,
    /// `cpu`, `cuda:0`, ... (empty when not known).
    pub device: String,
}

/// The `https://patchport.dev/port-provenance/v1` predicate: how a port's files came to
/// be. The statement's subjects are the artifact's files (path and sha256).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortProvenance {
    /// `adapter` (the ported adapter) or `merged` (the merged model).
    pub artifact: String,
    /// The port: `ns/patch:version@ns/base:version`.
    pub port: String,
    /// `patch`, `old_base` and `new_base`: each with its reference (`uri`,
    /// `patchport:ns/name:version`) and its manifest digest.
    pub inputs: Vec<ResourceDescriptor>,
    /// The method and its version.
    pub method: Method,
    /// The worker and device that ran it.
    pub worker: WorkerInfo,
    /// The port's diagnostics (per module and total, with the drift risk).
    pub diagnostics: serde_json::Value,
    /// The evaluation (the quality gate), when there was one.
    #[serde(default)]
    pub evaluation: Option<serde_json::Value>,
    /// The evaluation verdict (`improved`, `preserved`, `regressed`), when evaluated.
    #[serde(default)]
    pub verdict: Option<String>,
    /// When the port finished, Unix milliseconds.
    #[serde(default)]
    pub finished_at: Option<i64>,
}

/// An input of a provenance statement.
pub fn input(
    role: &str,
    reference: &str,
    digest: &str,
) -> Result<ResourceDescriptor, SigningError> {
    let d = FileDigest::new(role, digest)?;
    Ok(ResourceDescriptor {
        name: role.to_owned(),
        uri: Some(format!("patchport:{reference}")),
        digest: BTreeMap::from([("sha256".to_owned(), d.sha256)]),
    })
}

/// Signs a port's provenance over its files; returns `provenance.json`'s bytes (a DSSE
/// envelope, JSON).
pub fn sign_provenance(
    key: &SigningKey,
    files: &[FileDigest],
    predicate: &PortProvenance,
) -> Result<String, SigningError> {
    let mut files = files.to_vec();
    sort_files(&mut files);
    let statement = Statement {
        type_: STATEMENT_TYPE.to_owned(),
        subject: files
            .iter()
            .map(|f| ResourceDescriptor {
                name: f.path.clone(),
                uri: None,
                digest: BTreeMap::from([("sha256".to_owned(), f.sha256.clone())]),
            })
            .collect(),
        predicate_type: PORT_PROVENANCE_PREDICATE.to_owned(),
        predicate,
    };
    let payload = serde_json::to_vec_pretty(&statement).map_err(|e| SigningError::Input {
        message: e.to_string(),
    })?;
    let envelope = key.sign_envelope(IN_TOTO_PAYLOAD_TYPE, payload);
    serde_json::to_string_pretty(&envelope).map_err(|e| SigningError::Input {
        message: e.to_string(),
    })
}

/// A verified provenance statement.
#[derive(Debug, Clone, PartialEq)]
pub struct SignedProvenance {
    /// The subjects: the artifact's files.
    pub files: Vec<FileDigest>,
    /// The predicate.
    pub provenance: PortProvenance,
    /// The key that verified it.
    pub key_hint: String,
}

/// Verifies `provenance.json` with the trusted keys.
pub fn verify_provenance(
    envelope_json: &str,
    trusted: &[PublicKey],
) -> Result<SignedProvenance, SigningError> {
    let envelope: Envelope =
        serde_json::from_str(envelope_json).map_err(|e| malformed(PROVENANCE, e))?;
    let key = envelope.verify(trusted, PROVENANCE)?;
    let s: Statement<PortProvenance> = statement(&envelope, PROVENANCE)?;
    if s.predicate_type != PORT_PROVENANCE_PREDICATE {
        return Err(malformed(
            PROVENANCE,
            format!(
                "predicate type {:?}, expected {PORT_PROVENANCE_PREDICATE}",
                s.predicate_type
            ),
        ));
    }
    let files =
        s.subject
            .iter()
            .map(|d| {
                let sha = d.digest.get("sha256").ok_or_else(|| {
                    malformed(PROVENANCE, format!("{}: no sha256 digest", d.name))
                })?;
                FileDigest::new(d.name.clone(), sha).map_err(|e| malformed(PROVENANCE, e))
            })
            .collect::<Result<Vec<_>, _>>()?;
    Ok(SignedProvenance {
        files,
        provenance: s.predicate,
        key_hint: key.hint.clone(),
    })
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;

    use super::*;

    fn files() -> Vec<FileDigest> {
        vec![
            FileDigest::of("a.txt", b"hello\n"),
            FileDigest::of("sub/b.bin", b"x\n"),
            FileDigest::of("a/c", b"c"),
        ]
    }

    fn provenance() -> PortProvenance {
        PortProvenance {
            artifact: "adapter".to_owned(),
            port: "acme/qv:1@acme/llama:v2".to_owned(),
            inputs: vec![
                input("patch", "acme/qv:1", &format!("sha256:{}", "a".repeat(64))).unwrap(),
            ],
            method: Method {
                name: "portllm".to_owned(),
                version: "1".to_owned(),
            },
            worker: WorkerInfo {
                id: "w1".to_owned(),
                device: "cpu".to_owned(),
            },
            diagnostics: serde_json::json!({"risk": 0.25}),
            evaluation: None,
            verdict: None,
            finished_at: Some(1),
        }
    }

    #[test]
    fn a_model_signature_round_trips_and_has_model_signings_shape() {
        let key = SigningKey::generate();
        let sig = sign_model(&key, "m", &files()).unwrap();
        let signed = verify_model(&sig, std::slice::from_ref(key.public_key())).unwrap();
        // Sorted by path components, as model_signing does: "a/c" before "a.txt".
        let paths: Vec<_> = signed.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["a/c", "a.txt", "sub/b.bin"]);
        assert_eq!(signed.key_hint, key.public_key().hint());
        assert!(signed.ignore_paths.contains(&"model.sig".to_owned()));

        let v: serde_json::Value = serde_json::from_str(&sig).unwrap();
        assert_eq!(v["mediaType"], BUNDLE_MEDIA_TYPE);
        assert_eq!(
            v["verificationMaterial"]["publicKey"]["hint"],
            key.public_key().hint()
        );
        assert_eq!(v["dsseEnvelope"]["payloadType"], IN_TOTO_PAYLOAD_TYPE);
        let payload = B64
            .decode(v["dsseEnvelope"]["payload"].as_str().unwrap())
            .unwrap();
        let s: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(s["_type"], STATEMENT_TYPE);
        assert_eq!(s["predicateType"], MODEL_SIGNATURE_PREDICATE);
        assert_eq!(s["predicate"]["serialization"]["method"], "files");
        assert_eq!(s["predicate"]["resources"][1]["name"], "a.txt");
        assert_eq!(
            s["predicate"]["resources"][1]["digest"],
            "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
        );
    }

    #[test]
    fn a_tampered_model_signature_fails() {
        let key = SigningKey::generate();
        let sig = sign_model(&key, "m", &files()).unwrap();
        let trusted = [key.public_key().clone()];
        let mut bundle: Bundle = serde_json::from_str(&sig).unwrap();
        // Another digest in the payload: the signature no longer covers it.
        let text = String::from_utf8(bundle.dsse_envelope.payload.clone()).unwrap();
        bundle.dsse_envelope.payload = text.replacen("5891", "5892", 1).into_bytes();
        let tampered = serde_json::to_string(&bundle).unwrap();
        assert!(matches!(
            verify_model(&tampered, &trusted),
            Err(SigningError::BadSignature { .. })
        ));
        // One bit of the signature.
        let mut bundle: Bundle = serde_json::from_str(&sig).unwrap();
        let last = bundle.dsse_envelope.signatures[0].sig.len() - 1;
        bundle.dsse_envelope.signatures[0].sig[last] ^= 1;
        assert!(verify_model(&serde_json::to_string(&bundle).unwrap(), &trusted).is_err());
        // Not JSON at all.
        assert!(matches!(
            verify_model("{", &trusted),
            Err(SigningError::Malformed { .. })
        ));
    }

    #[test]
    fn another_key_is_refused_and_rotation_trusts_both() {
        let old = SigningKey::generate();
        let new = SigningKey::generate();
        let sig = sign_model(&old, "m", &files()).unwrap();
        let err = verify_model(&sig, std::slice::from_ref(new.public_key())).unwrap_err();
        assert!(matches!(err, SigningError::Untrusted { .. }), "{err}");
        // A bundle claiming the new key's hint but signed by the old key.
        let mut bundle: Bundle = serde_json::from_str(&sig).unwrap();
        bundle.verification_material.public_key.hint = Some(new.public_key().hint().to_owned());
        let forged = serde_json::to_string(&bundle).unwrap();
        assert!(verify_model(&forged, std::slice::from_ref(new.public_key())).is_err());
        // Rotation: both keys trusted, the old signature still verifies.
        let trusted = [new.public_key().clone(), old.public_key().clone()];
        assert_eq!(
            verify_model(&sig, &trusted).unwrap().key_hint,
            old.public_key().hint()
        );
    }

    #[test]
    fn provenance_round_trips_and_refuses_tampering_and_other_keys() {
        let key = SigningKey::generate();
        let doc = sign_provenance(&key, &files(), &provenance()).unwrap();
        let trusted = [key.public_key().clone()];
        let p = verify_provenance(&doc, &trusted).unwrap();
        assert_eq!(p.provenance, provenance());
        assert_eq!(p.files.len(), 3);
        let mut env: Envelope = serde_json::from_str(&doc).unwrap();
        let text = String::from_utf8(env.payload.clone()).unwrap();
        env.payload = text.replace("\"w1\"", "\"w2\"").into_bytes();
        assert!(verify_provenance(&serde_json::to_string(&env).unwrap(), &trusted).is_err());
        let other = SigningKey::generate();
        assert!(matches!(
            verify_provenance(&doc, std::slice::from_ref(other.public_key())),
            Err(SigningError::Untrusted { .. })
        ));
    }

    #[test]
    fn keys_round_trip_through_pem() {
        let key = SigningKey::generate();
        let again = SigningKey::from_pem(&key.to_pem()).unwrap();
        assert_eq!(again.public_key(), key.public_key());
        let public = PublicKey::from_pem(key.public_key().pem()).unwrap();
        assert_eq!(public.hint(), key.public_key().hint());
        let two = format!(
            "{}\n{}",
            key.public_key().pem(),
            SigningKey::generate().public_key().pem()
        );
        assert_eq!(PublicKey::parse_all(&two).unwrap().len(), 2);
        assert!(SigningKey::from_pem("nonsense").is_err());
        assert!(PublicKey::parse_all("nonsense").is_err());
    }

    #[test]
    fn bad_input_is_refused() {
        let key = SigningKey::generate();
        assert!(FileDigest::new("a", "sha256:xyz").is_err());
        assert!(FileDigest::new("../a", &"0".repeat(64)).is_err());
        let dup = [FileDigest::of("a", b"1"), FileDigest::of("a", b"2")];
        assert!(sign_model(&key, "m", &dup).is_err());
        assert!(sign_model(&key, "m", &[FileDigest::of("model.sig", b"")]).is_err());
        assert!(is_ignored(".git/config", &IGNORED_PATHS));
        assert!(!is_ignored(".gitx", &IGNORED_PATHS));
    }

    /// A key and a bundle made by Python's `cryptography` + model_signing 1.1.1
    /// (`model_signing sign key`), verified here: the formats agree both ways.
    #[test]
    fn a_bundle_made_by_model_signing_verifies() {
        let public = PublicKey::from_pem(PY_PUBLIC).unwrap();
        assert_eq!(
            public.hint(),
            "893880f6f9b25d1bec6979921af78e522d654342ca9cfb9a8f1bf0d01586b0f4"
        );
        let signed = verify_model(PY_BUNDLE, &[public]).unwrap();
        assert_eq!(signed.files, {
            let mut f = vec![
                FileDigest::of("a.txt", b"hello\n"),
                FileDigest::of("sub/b.bin", b"x\n"),
            ];
            sort_files(&mut f);
            f
        });
    }

    const PY_PUBLIC: &str = include_str!("../testdata/python-public.pem");
    const PY_BUNDLE: &str = include_str!("../testdata/python-model.sig");
}
