//! Signatures beside pulled files (`model.sig`, and `provenance.json` for a port), and
//! their offline verification with trusted public keys.

use std::path::Path;

use patchport_core::AnyRef;
use patchport_proto::v1;
use patchport_signing::{
    FileDigest, PROVENANCE_FILE, PublicKey, SIGNATURE_FILE, SignedModel, SignedProvenance,
    is_ignored, verify_model, verify_provenance,
};

use crate::{Client, ClientError, scan_dir};

/// What a pull wrote beside the files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureFiles {
    /// The signing key's hint.
    pub key_hint: String,
    /// Whether `provenance.json` was written (ports).
    pub provenance: bool,
}

impl Client {
    /// Fetches the signature of what `reference` names and writes `model.sig` (and, for a
    /// port, `provenance.json`) into `out`, byte for byte as the registry serves them.
    /// `None` when the registry signs nothing (FAILED_PRECONDITION) or predates
    /// signatures (UNIMPLEMENTED).
    pub async fn write_signature(
        &self,
        reference: &AnyRef,
        out: &Path,
        merged: bool,
    ) -> Result<Option<SignatureFiles>, ClientError> {
        let reference = match reference {
            AnyRef::Version(r) => r.to_string(),
            AnyRef::Port(p) => p.to_string(),
        };
        let sig = match self
            .signing()
            .get_signature(v1::GetSignatureRequest {
                reference: reference.clone(),
                merged,
            })
            .await
        {
            Ok(s) => s.into_inner(),
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::FailedPrecondition | tonic::Code::Unimplemented
                ) =>
            {
                tracing::warn!(reference = %reference, reason = %s.message(), "no signature");
                return Ok(None);
            }
            Err(s) => return Err(s.into()),
        };
        let write = |name: &str, text: &str| {
            let path = out.join(name);
            std::fs::write(&path, text).map_err(|e| ClientError::io(path.display(), e))
        };
        if !sig.provenance.is_empty() {
            write(PROVENANCE_FILE, &sig.provenance)?;
        }
        write(SIGNATURE_FILE, &sig.model_signature)?;
        Ok(Some(SignatureFiles {
            key_hint: sig.key_hint,
            provenance: !sig.provenance.is_empty(),
        }))
    }
}

/// A directory whose signature (and provenance) verified.
#[derive(Debug, Clone)]
pub struct DirVerification {
    /// The model signature.
    pub model: SignedModel,
    /// The port provenance, when the directory has one.
    pub provenance: Option<SignedProvenance>,
}

fn mismatch(message: String) -> ClientError {
    ClientError::Invalid { message }
}

/// Compares the files found with the files signed; the error names every difference.
fn same_files(what: &str, signed: &[FileDigest], found: &[FileDigest]) -> Result<(), ClientError> {
    let signed: std::collections::BTreeMap<_, _> =
        signed.iter().map(|f| (&f.path, &f.sha256)).collect();
    let found: std::collections::BTreeMap<_, _> =
        found.iter().map(|f| (&f.path, &f.sha256)).collect();
    let mut problems = Vec::new();
    for (path, digest) in &found {
        match signed.get(path) {
            None => problems.push(format!("{path} is not signed")),
            Some(d) if d != digest => problems.push(format!(
                "{path} hashes to sha256:{digest}, signed sha256:{d}"
            )),
            Some(_) => {}
        }
    }
    for path in signed.keys().filter(|p| !found.contains_key(*p)) {
        problems.push(format!("{path} is signed but missing"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(mismatch(format!(
            "{what} does not match the files: {}",
            problems.join("; ")
        )))
    }
}

/// Verifies a pulled directory offline: `model.sig` with one of `trusted`, every file
/// (except the paths the signature skips, and entries starting with `.`) hashed and
/// compared with the signed set; and when the signature includes `provenance.json`, its
/// signature with `trusted` and its subjects against the files (all but `model.sig` and
/// `provenance.json`).
pub fn verify_dir(dir: &Path, trusted: &[PublicKey]) -> Result<DirVerification, ClientError> {
    let sig_path = dir.join(SIGNATURE_FILE);
    let sig =
        std::fs::read_to_string(&sig_path).map_err(|e| ClientError::io(sig_path.display(), e))?;
    let model = verify_model(&sig, trusted).map_err(|e| mismatch(e.to_string()))?;
    let found: Vec<FileDigest> = scan_dir(dir)?
        .into_iter()
        .filter(|f| !is_ignored(&f.path, &model.ignore_paths) && f.path != SIGNATURE_FILE)
        .map(|f| FileDigest::new(f.path, &f.digest.to_string()))
        .collect::<Result<_, _>>()
        .map_err(|e| mismatch(e.to_string()))?;
    same_files(SIGNATURE_FILE, &model.files, &found)?;
    let provenance = if model.files.iter().any(|f| f.path == PROVENANCE_FILE) {
        let path = dir.join(PROVENANCE_FILE);
        let text =
            std::fs::read_to_string(&path).map_err(|e| ClientError::io(path.display(), e))?;
        let p = verify_provenance(&text, trusted).map_err(|e| mismatch(e.to_string()))?;
        let outputs: Vec<FileDigest> = found
            .iter()
            .filter(|f| f.path != PROVENANCE_FILE)
            .cloned()
            .collect();
        same_files(PROVENANCE_FILE, &p.files, &outputs)?;
        Some(p)
    } else {
        None
    };
    Ok(DirVerification { model, provenance })
}
