//! The build-service types: port jobs, leases, outcomes, retry policy and event cursors.

use std::fmt;
use std::time::Duration;

use patchport_core::Digest;
use patchport_core::layout::ArtifactFile;
use patchport_core::port::{PortDiagnostics, Refusal};

use super::{PortRecord, PortState, StoreError};

/// How failed attempts are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts before a job fails for good (stored on each job when it is created).
    pub max_attempts: u32,
    /// Backoff before the second attempt (doubling each time).
    pub base: Duration,
    /// The longest backoff.
    pub cap: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            base: Duration::from_secs(2),
            cap: Duration::from_secs(300),
        }
    }
}

impl RetryPolicy {
    /// The backoff after the `attempt`th attempt failed (1-based): full jitter, a uniform
    /// draw in `[0, min(cap, base * 2^(attempt-1))]` milliseconds.
    pub fn backoff_millis(&self, attempt: u32) -> i64 {
        let ceiling = self.ceiling_millis(attempt);
        if ceiling == 0 {
            0
        } else {
            rand::random_range(0..=ceiling)
        }
    }

    /// The upper bound of `backoff_millis(attempt)`.
    pub fn ceiling_millis(&self, attempt: u32) -> i64 {
        let exp = attempt.saturating_sub(1).min(32);
        let base = self.base.as_millis().min(i64::MAX as u128) as i64;
        let cap = self.cap.as_millis().min(i64::MAX as u128) as i64;
        base.saturating_mul(1i64 << exp).min(cap)
    }
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    /// Its id.
    pub id: i64,
    /// `port:<patch digest>:<source base digest>:<target base digest>:<method version>`.
    pub job_key: String,
    /// The patch content.
    pub patch_digest: Digest,
    /// The base it was trained on.
    pub source_base_digest: Digest,
    /// The base to port onto (what a worker must have loaded).
    pub target_base_digest: Digest,
    /// The port method.
    pub method_version: String,
    /// Where it stands (the port states).
    pub state: PortState,
    /// Higher first.
    pub priority: i64,
    /// Attempts started.
    pub attempts: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// Unix ms before which it is not leased.
    pub run_after: i64,
    /// The worker holding the lease.
    pub lease_owner: Option<String>,
    /// Unix ms.
    pub lease_expires_at: Option<i64>,
    /// The current attempt's fence.
    pub fencing_token: i64,
    /// Every port of the running job was cancelled.
    pub cancel_requested: bool,
    /// The last attempt's error.
    pub last_error: Option<String>,
}

/// A job handed to a worker.
#[derive(Debug, Clone, PartialEq)]
pub struct LeasedJob {
    /// The job (state running, attempts and fencing token already incremented).
    pub job: JobRecord,
    /// Its port rows (every patch version with this content), now running.
    pub ports: Vec<PortRecord>,
}

/// What a finished attempt produced.
#[derive(Debug, Clone, PartialEq)]
pub enum JobOutcome {
    /// Ported.
    Succeeded {
        /// The ported adapter.
        adapter_files: Vec<ArtifactFile>,
        /// The merged model.
        merged_files: Vec<ArtifactFile>,
        /// Portability diagnostics.
        diagnostics: PortDiagnostics,
        /// The quality gate's result, when the worker evaluated the port.
        evaluation: Option<EvaluationRecord>,
    },
    /// Refused by pre-flight: final, never retried.
    Incompatible {
        /// Why.
        refusals: Vec<Refusal>,
    },
}

/// A port's evaluation as the store keeps it: opaque JSON plus the one word the
/// `port.evaluated` event carries (`improved`, `preserved`, `regressed`,
/// `not_evaluable`, `failed`).
#[derive(Debug, Clone, PartialEq)]
pub struct EvaluationRecord {
    /// The event detail.
    pub summary: String,
    /// The full result.
    pub json: String,
}

/// A position in the event log, opaque to clients (`pg:<xid>:<id>` or `sq:<id>`), except
/// for the documented origin `0`, before the first event of any store.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EventCursor(pub(crate) String);

impl EventCursor {
    /// The documented cursor that replays the whole log.
    pub const ORIGIN: &'static str = "0";

    /// Before the first event of any store (reads everything).
    pub fn origin() -> Self {
        Self(Self::ORIGIN.to_owned())
    }

    /// Whether this is the origin (`0`; `origin` is accepted too, as older servers
    /// documented nothing).
    pub(crate) fn is_origin(&self) -> bool {
        self.0 == Self::ORIGIN || self.0 == "origin"
    }

    /// The cursor as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EventCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for EventCursor {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

pub(crate) fn bad_cursor(c: &EventCursor) -> StoreError {
    StoreError::InvalidCursor {
        cursor: c.0.clone(),
    }
}

pub(crate) fn lease_lost(job_id: i64) -> StoreError {
    StoreError::FailedPrecondition {
        message: format!("lease lost on job {job_id}"),
    }
}

/// One event of the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    /// Where a reader resumes after this event.
    pub cursor: EventCursor,
    /// Unique id (for dedupe).
    pub id: i64,
    /// What happened.
    pub kind: patchport_core::event::EventKind,
    /// `acme/llama:v2` or `acme/qv:1@acme/llama:v2`.
    pub subject: String,
    /// The job, for port events.
    pub job_id: Option<i64>,
    /// The port row, for port events.
    pub port_id: Option<i64>,
    /// The new state or why (`retry`, `released`, `lease expired`...).
    pub detail: Option<String>,
    /// What a subscriber needs without a follow-up call (JSON object): digests, state,
    /// refusal kinds, risk and a diagnostics summary for ports; the digest (and parent or
    /// base) for versions. `None` on events written before payloads were stored.
    pub payload_json: Option<String>,
    /// Unix ms.
    pub created_at: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_full_jitter() {
        let p = RetryPolicy::default();
        assert_eq!(p.ceiling_millis(1), 2_000);
        assert_eq!(p.ceiling_millis(2), 4_000);
        assert_eq!(p.ceiling_millis(8), 256_000);
        assert_eq!(p.ceiling_millis(9), 300_000);
        assert_eq!(p.ceiling_millis(1_000), 300_000);
        for attempt in 1..20 {
            let b = p.backoff_millis(attempt);
            assert!((0..=p.ceiling_millis(attempt)).contains(&b));
        }
    }
}
