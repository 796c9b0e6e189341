//! The registry's signatures: every stored version and every port artifact gets an
//! OpenSSF Model Signing signature, and every port artifact a signed provenance, made
//! from the digests the registry already holds (never by reading a file).
//!
//! Versions are signed when they are committed, ports when they complete; a subject
//! found unsigned on read (a crash between commit and signing, data from before signing
//! was on) is signed then. Signatures live in the `signatures` table, keyed by subject;
//! the first stored stays, except that a port's completion replaces what a reader may
//! have signed meanwhile (without the worker's id and device).

use std::sync::Arc;

use patchport_core::layout::FileRef;
use patchport_core::{Name, Version, VersionRef};
use patchport_signing::{
    FileDigest, Method, PROVENANCE_FILE, PortProvenance, PublicKey, SigningError, SigningKey,
    WorkerInfo, input, sign_model, sign_provenance,
};
use patchport_store::meta::{PortRecord, SignatureRecord, now_millis};

use crate::error::{ApiError, ApiResult};
use crate::state::Registry;

/// The key that signs and the public keys that verify (the active one first, then older
/// keys still trusted after a rotation).
#[derive(Debug)]
pub struct SigningKeys {
    active: SigningKey,
    trusted: Vec<PublicKey>,
}

impl SigningKeys {
    /// `active` signs; `older` are served as still trusted (duplicates of the active key
    /// are dropped).
    pub fn new(active: SigningKey, older: Vec<PublicKey>) -> Self {
        let mut trusted = vec![active.public_key().clone()];
        for k in older {
            if !trusted.contains(&k) {
                trusted.push(k);
            }
        }
        Self { active, trusted }
    }

    /// The signing key.
    pub fn active(&self) -> &SigningKey {
        &self.active
    }

    /// Every trusted public key, the active one first.
    pub fn trusted(&self) -> &[PublicKey] {
        &self.trusted
    }
}

/// Which kind of version a signature is about.
#[derive(Debug, Clone, Copy)]
pub(crate) enum VersionKind {
    Base,
    Patch,
}

fn signing_failed(e: SigningError) -> ApiError {
    ApiError::internal("signing", e.to_string())
}

fn digests<'a>(files: impl IntoIterator<Item = &'a FileRef>) -> ApiResult<Vec<FileDigest>> {
    files
        .into_iter()
        .map(|f| FileDigest::new(f.path.clone(), &f.digest.to_string()))
        .collect::<Result<_, _>>()
        .map_err(signing_failed)
}

impl Registry {
    /// A version's signature: the stored one, or a new one when the registry signs.
    /// `None` when it is unsigned and the registry has no key.
    pub(crate) async fn version_signature(
        &self,
        kind: VersionKind,
        name: &Name,
        version: &Version,
        files: &[FileRef],
    ) -> ApiResult<Option<SignatureRecord>> {
        let kind = match kind {
            VersionKind::Base => "base",
            VersionKind::Patch => "patch",
        };
        let subject = format!("{kind}:{name}:{version}");
        if let Some(found) = self.meta.get_signature(&subject).await? {
            return Ok(Some(found));
        }
        let Some(keys) = &self.signing else {
            return Ok(None);
        };
        let model_sig = sign_model(
            keys.active(),
            &format!("{name}:{version}"),
            &digests(files)?,
        )
        .map_err(signing_failed)?;
        let record = SignatureRecord {
            subject,
            model_sig,
            provenance: None,
            key_hint: keys.active().public_key().hint().to_owned(),
            created_at: now_millis(),
        };
        Ok(Some(self.meta.put_signature(&record, false).await?))
    }

    /// Signs a version right after its commit; a failure is logged (the next read signs).
    pub(crate) async fn sign_version(
        &self,
        kind: VersionKind,
        name: &Name,
        version: &Version,
        files: &[FileRef],
    ) {
        if self.signing.is_some()
            && let Err(e) = self.version_signature(kind, name, version, files).await
        {
            tracing::warn!(%name, %version, error = %e, "signing a version failed; it is signed when next read");
        }
    }

    /// A port artifact's signature and provenance: the stored ones, or new ones when the
    /// registry signs (`replace` re-signs, with `worker` known). `None` when unsigned and
    /// the registry has no key, or when the port has no such artifact.
    pub(crate) async fn port_signature(
        &self,
        port: &PortRecord,
        merged: bool,
        worker: Option<&WorkerInfo>,
        replace: bool,
    ) -> ApiResult<Option<SignatureRecord>> {
        let artifact = if merged { "merged" } else { "adapter" };
        let subject = format!("port:{}:{artifact}", port.id);
        if !replace && let Some(found) = self.meta.get_signature(&subject).await? {
            return Ok(Some(found));
        }
        let files = if merged {
            &port.merged_files
        } else {
            &port.adapter_files
        };
        let Some(keys) = &self.signing else {
            return Ok(None);
        };
        if files.is_empty() {
            return Ok(None);
        }
        let files = digests(files.iter().map(|f| &f.file))?;
        let patch = self
            .meta
            .get_patch_version(
                &port.patch_name,
                &VersionRef::Version(port.patch_version.clone()),
            )
            .await?
            .ok_or_else(|| ApiError::internal("signing a port", "its patch version vanished"))?;
        let patch_ref = format!("{}:{}", port.patch_name, port.patch_version);
        let base_ref = format!("{}:{}", port.base_name, port.base_version);
        let old_ref = format!("{}:{}", patch.base_name, patch.base_version);
        let inputs = [
            input("patch", &patch_ref, &port.patch_digest.to_string()),
            input("old_base", &old_ref, &port.source_base_digest.to_string()),
            input("new_base", &base_ref, &port.base_digest.to_string()),
        ]
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(signing_failed)?;
        let mut diagnostics = serde_json::to_value(&port.diagnostics).unwrap_or_default();
        if let (Some(d), Some(obj)) = (&port.diagnostics, diagnostics.as_object_mut()) {
            obj.insert("risk".to_owned(), serde_json::json!(d.risk()));
        }
        let evaluation = port
            .evaluation_json
            .as_deref()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
            .map(|mut v| {
                // The per-item report stays in the registry; the summary is signed.
                if let Some(o) = v.as_object_mut() {
                    o.remove("report");
                }
                v
            });
        let verdict = evaluation
            .as_ref()
            .and_then(|e| e.get("verdict"))
            .and_then(|v| v.as_str())
            .filter(|v| !v.is_empty())
            .map(str::to_owned);
        let provenance = PortProvenance {
            artifact: artifact.to_owned(),
            port: format!("{patch_ref}@{base_ref}"),
            inputs,
            method: Method {
                name: "portllm".to_owned(),
                version: port.method_version.clone(),
            },
            worker: worker.cloned().unwrap_or(WorkerInfo {
                id: String::new(),
                device: String::new(),
            }),
            diagnostics,
            evaluation,
            verdict,
            finished_at: port.finished_at,
        };
        let provenance =
            sign_provenance(keys.active(), &files, &provenance).map_err(signing_failed)?;
        // The provenance is one of the files model.sig signs: the standard verifier alone
        // then checks it is the registry's, byte for byte.
        let mut signed = files;
        signed.push(FileDigest::of(PROVENANCE_FILE, provenance.as_bytes()));
        let model_sig = sign_model(keys.active(), &format!("{patch_ref}@{base_ref}"), &signed)
            .map_err(signing_failed)?;
        let record = SignatureRecord {
            subject,
            model_sig,
            provenance: Some(provenance),
            key_hint: keys.active().public_key().hint().to_owned(),
            created_at: now_millis(),
        };
        Ok(Some(self.meta.put_signature(&record, replace).await?))
    }

    /// Signs the artifacts of a job's ports right after it completed; failures are
    /// logged (the next read signs, without the worker).
    pub(crate) async fn sign_ports(&self, ports: &[PortRecord], worker: &WorkerInfo) {
        if self.signing.is_none() {
            return;
        }
        for port in ports {
            for merged in [false, true] {
                if let Err(e) = self.port_signature(port, merged, Some(worker), true).await {
                    tracing::warn!(port_id = port.id, error = %e, "signing a port failed; it is signed when next read");
                }
            }
        }
    }
}

/// Shared keys (cheap to clone).
pub(crate) type Keys = Option<Arc<SigningKeys>>;
