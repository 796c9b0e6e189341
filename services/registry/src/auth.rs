//! Who is calling and what they may do: bearer tokens with a scope on a namespace, the
//! bootstrap admin token, anonymous reads per namespace, the push rate limit, and the
//! audit log of every state change.
//!
//! A token is `pp_<id>_<secret>`: the id is public (listed, audited), the secret is 32
//! random bytes shown once; the store keeps only `sha256(secret)`. Token records are
//! cached for [`CACHE_TTL`], so a revocation reaches every replica within that time (at
//! once on the replica that revoked it). The cache is bounded: at most
//! [`TOKEN_CACHE_CAPACITY`] records the store holds and [`MISS_CACHE_CAPACITY`] ids it
//! does not, least recently used out first, so a flood of made-up token ids costs a
//! lookup each but no memory that stays.
//!
//! A poisoned lock (a panic while one was held) never fails a later request: every lock
//! here recovers its guard, the caches hold nothing a panic can leave half-written.
//!
//! Checks run before any lookup, on the namespace named in the request, so a refusal
//! never tells whether a private name exists.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use std::collections::{HashMap, HashSet};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use hashlink::LruCache;
use patchport_store::meta::{AuditRecord, MetadataStore, TokenRecord, now_millis};
use sha2::{Digest as _, Sha256};
use tonic::metadata::MetadataMap;

use crate::error::{ApiError, ApiResult};
use crate::limits::{StreamCaps, StreamKind, StreamPermit};

/// How long a token record or the anonymous-namespace list is trusted from cache.
pub const CACHE_TTL: Duration = Duration::from_secs(5);

/// Most token records (found in the store) cached at once.
pub const TOKEN_CACHE_CAPACITY: usize = 10_000;

/// Most token ids the store does not hold cached at once (each for [`CACHE_TTL`]).
pub const MISS_CACHE_CAPACITY: usize = 1_024;

/// Locks `m`, recovering the guard of a lock poisoned by a panic elsewhere: the data
/// behind these locks are caches whose every write is a single insert or remove.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// List, get, pull, compat, resolve, events.
    Read,
    /// Read, plus push and yank versions and request or cancel ports.
    Push,
    /// Push, plus tokens, namespace policies and the audit log.
    Admin,
    /// Lease, heartbeat, complete, fail and release port jobs, with the reads and
    /// uploads a port needs (any namespace: a worker ports every patch); nothing else.
    Worker,
}

impl Scope {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Push => "push",
            Scope::Admin => "admin",
            Scope::Worker => "worker",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> ApiResult<Self> {
        Ok(match s {
            "read" => Scope::Read,
            "push" => Scope::Push,
            "admin" => Scope::Admin,
            "worker" => Scope::Worker,
            other => {
                return Err(ApiError::invalid(format!(
                    "unknown scope {other:?}: expected read, push, admin or worker"
                )));
            }
        })
    }
}

/// What a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Read a namespace.
    Read,
    /// Change a namespace.
    Push,
    /// Administer a namespace.
    Admin,
    /// Work the port queue.
    Worker,
}

impl Need {
    fn verb(self) -> &'static str {
        match self {
            Need::Read => "read",
            Need::Push => "push to",
            Need::Admin => "administer",
            Need::Worker => "work the port queue of",
        }
    }
}

/// The caller of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// No token (auth off, or an anonymous read).
    Anonymous,
    /// The `PATCHPORT_ADMIN_TOKEN` of the server's environment: admin on `*`.
    Bootstrap,
    /// The registry's own in-process workers (a secret minted at start, never stored).
    Internal,
    /// A stored token.
    Token {
        /// Its public id.
        id: String,
        /// A namespace or `*`.
        namespace: String,
        /// Its scope.
        scope: Scope,
    },
}

impl Principal {
    /// The name recorded in the audit log.
    pub fn actor(&self) -> String {
        match self {
            Principal::Anonymous => "anonymous".to_owned(),
            Principal::Bootstrap => "bootstrap".to_owned(),
            Principal::Internal => "internal-worker".to_owned(),
            Principal::Token { id, .. } => id.clone(),
        }
    }

    /// Whether this principal may `need` on `namespace` (policies aside).
    pub fn may(&self, need: Need, namespace: &str) -> bool {
        match self {
            Principal::Anonymous => false,
            Principal::Bootstrap => true,
            Principal::Internal => matches!(need, Need::Worker | Need::Read),
            Principal::Token {
                namespace: own,
                scope,
                ..
            } => {
                let here = own == "*" || own == namespace;
                match (need, scope) {
                    (Need::Worker, Scope::Worker) => true,
                    (Need::Worker, Scope::Admin) => own == "*",
                    (Need::Worker, _) => false,
                    // A worker reads whatever it ports.
                    (Need::Read, Scope::Worker) => true,
                    (_, Scope::Worker) => false,
                    (Need::Read, _) => here,
                    (Need::Push, Scope::Push | Scope::Admin) => here,
                    (Need::Push, Scope::Read) => false,
                    (Need::Admin, Scope::Admin) => here,
                    (Need::Admin, _) => false,
                }
            }
        }
    }

    /// Whether it is admin on every namespace.
    pub fn is_global_admin(&self) -> bool {
        match self {
            Principal::Bootstrap => true,
            Principal::Token {
                namespace, scope, ..
            } => namespace == "*" && *scope == Scope::Admin,
            Principal::Anonymous | Principal::Internal => false,
        }
    }
}

/// Access-control settings.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// Whether requests need tokens (reads of anonymous-read namespaces aside).
    pub enabled: bool,
    /// The bootstrap admin token, if any.
    pub admin_token: Option<String>,
    /// Version pushes per minute per token (burst: the same number).
    pub push_rate_per_minute: u32,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            admin_token: None,
            push_rate_per_minute: 600,
        }
    }
}

/// Token records by id with the time they were read: found ones and misses apart, each
/// bounded, least recently used out first.
struct TokenCache {
    found: LruCache<String, (Instant, TokenRecord)>,
    missing: LruCache<String, Instant>,
}

impl Default for TokenCache {
    fn default() -> Self {
        Self {
            found: LruCache::new(TOKEN_CACHE_CAPACITY),
            missing: LruCache::new(MISS_CACHE_CAPACITY),
        }
    }
}

impl TokenCache {
    /// A fresh cached answer for `id`: `Some(None)` is a cached miss.
    fn get(&mut self, id: &str) -> Option<Option<TokenRecord>> {
        if let Some((at, rec)) = self.found.get(id) {
            if at.elapsed() < CACHE_TTL {
                return Some(Some(rec.clone()));
            }
            self.found.remove(id);
        }
        if let Some(at) = self.missing.get(id) {
            if at.elapsed() < CACHE_TTL {
                return Some(None);
            }
            self.missing.remove(id);
        }
        None
    }

    fn insert(&mut self, id: &str, rec: Option<TokenRecord>) {
        let now = Instant::now();
        match rec {
            Some(rec) => {
                self.missing.remove(id);
                self.found.insert(id.to_owned(), (now, rec));
            }
            None => {
                self.found.remove(id);
                self.missing.insert(id.to_owned(), now);
            }
        }
        self.report();
    }

    fn remove(&mut self, id: &str) {
        self.found.remove(id);
        self.missing.remove(id);
        self.report();
    }

    fn len(&self) -> (usize, usize) {
        (self.found.len(), self.missing.len())
    }

    fn report(&self) {
        let (found, missing) = self.len();
        metrics::gauge!(patchport_telemetry::TOKEN_CACHE_ENTRIES, "kind" => "valid")
            .set(found as f64);
        metrics::gauge!(patchport_telemetry::TOKEN_CACHE_ENTRIES, "kind" => "miss")
            .set(missing as f64);
    }
}

/// A list of namespaces.
type Namespaces = Vec<String>;

/// Resolves and checks callers (cheap to clone).
#[derive(Clone)]
pub struct Auth {
    enabled: bool,
    bootstrap: Option<[u8; 32]>,
    internal: (String, [u8; 32]),
    meta: Arc<dyn MetadataStore>,
    tokens: Arc<Mutex<TokenCache>>,
    anonymous: Arc<Mutex<Option<(Instant, Namespaces)>>>,
    pushes: Arc<DefaultKeyedRateLimiter<String>>,
    push_rate: u32,
    streams: StreamCaps,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("enabled", &self.enabled)
            .field("bootstrap", &self.bootstrap.is_some())
            .field("push_rate", &self.push_rate)
            .finish_non_exhaustive()
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// The token of an `authorization` value `Bearer <token>` (`bearer` too), trimmed.
pub fn bearer(value: &str) -> Option<&str> {
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
}

/// `pp_<id>_<secret>` split into its id (16 hex digits) and secret (64 hex digits).
pub fn split_token(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix("pp_")?;
    let (id, secret) = rest.split_once('_')?;
    (id.len() == 16
        && secret.len() == 64
        && id.bytes().all(|b| b.is_ascii_hexdigit())
        && secret.bytes().all(|b| b.is_ascii_hexdigit()))
    .then_some((id, secret))
}

/// A fresh token: its record (hash only) and the secret to show once.
pub fn mint_token(
    namespace: &str,
    scope: Scope,
    description: &str,
    created_by: &str,
    expires_at: Option<i64>,
) -> (TokenRecord, String) {
    let id = hex::encode(rand::random::<[u8; 8]>());
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let record = TokenRecord {
        id: id.clone(),
        secret_hash: hex::encode(sha256(secret.as_bytes())),
        namespace: namespace.to_owned(),
        scope: scope.as_str().to_owned(),
        description: description.to_owned(),
        created_by: created_by.to_owned(),
        created_at: now_millis(),
        expires_at,
        revoked_at: None,
    };
    (record, format!("pp_{id}_{secret}"))
}

/// The namespace of `namespace/name[...]`.
pub fn namespace_of(name: &str) -> &str {
    name.split('/').next().unwrap_or(name)
}

impl Auth {
    /// Access control over `meta`.
    pub fn new(config: &AuthConfig, meta: Arc<dyn MetadataStore>) -> Self {
        let rate = NonZeroU32::new(config.push_rate_per_minute.max(1)).unwrap_or(NonZeroU32::MIN);
        let internal = format!("ppi_{}", hex::encode(rand::random::<[u8; 32]>()));
        let internal_hash = sha256(internal.as_bytes());
        Self {
            internal: (internal, internal_hash),
            enabled: config.enabled || config.admin_token.is_some(),
            bootstrap: config.admin_token.as_deref().map(|t| sha256(t.as_bytes())),
            meta,
            tokens: Arc::default(),
            anonymous: Arc::default(),
            pushes: Arc::new(RateLimiter::keyed(Quota::per_minute(rate))),
            push_rate: rate.get(),
            streams: StreamCaps::default(),
        }
    }

    /// The credential of this registry's in-process workers: worker scope, valid until
    /// the process exits, never stored or logged.
    pub fn internal_worker_token(&self) -> &str {
        &self.internal.0
    }

    /// Whether requests need tokens.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The caller named by the `authorization` metadata.
    pub async fn principal(&self, md: &MetadataMap) -> ApiResult<Principal> {
        let Some(value) = md.get("authorization") else {
            return Ok(Principal::Anonymous);
        };
        if !self.enabled {
            // Auth off: a token is accepted and ignored.
            return Ok(Principal::Anonymous);
        }
        let token = value.to_str().ok().and_then(bearer).ok_or_else(|| {
            ApiError::unauthenticated("malformed authorization metadata: expected `Bearer <token>`")
        })?;
        let presented = sha256(token.as_bytes());
        if self.bootstrap.as_ref() == Some(&presented) {
            return Ok(Principal::Bootstrap);
        }
        if self.internal.1 == presented {
            return Ok(Principal::Internal);
        }
        let invalid = || ApiError::unauthenticated("invalid, expired or revoked token");
        let (id, secret) = split_token(token).ok_or_else(invalid)?;
        let record = self.token_record(id).await?.ok_or_else(invalid)?;
        let presented = hex::encode(sha256(secret.as_bytes()));
        if presented != record.secret_hash
            || record.revoked_at.is_some()
            || record.expires_at.is_some_and(|e| e <= now_millis())
        {
            return Err(invalid());
        }
        let scope = Scope::parse(&record.scope).map_err(|_| invalid())?;
        Ok(Principal::Token {
            id: record.id,
            namespace: record.namespace,
            scope,
        })
    }

    async fn token_record(&self, id: &str) -> ApiResult<Option<TokenRecord>> {
        if let Some(cached) = lock(&self.tokens).get(id) {
            return Ok(cached);
        }
        let rec = self.meta.get_token(id).await?;
        lock(&self.tokens).insert(id, rec.clone());
        Ok(rec)
    }

    /// How many token records and misses this replica has cached.
    pub fn token_cache_len(&self) -> (usize, usize) {
        lock(&self.tokens).len()
    }

    /// Drops a token from this replica's cache (after a revocation).
    pub fn forget(&self, id: &str) {
        lock(&self.tokens).remove(id);
    }

    /// Drops the cached anonymous-read namespaces (after a policy change).
    pub fn forget_policies(&self) {
        *lock(&self.anonymous) = None;
    }

    async fn anonymous_namespaces(&self) -> ApiResult<Vec<String>> {
        if let Some((at, list)) = &*lock(&self.anonymous)
            && at.elapsed() < CACHE_TTL
        {
            return Ok(list.clone());
        }
        let list = self.meta.anonymous_namespaces().await?;
        *lock(&self.anonymous) = Some((Instant::now(), list.clone()));
        Ok(list)
    }

    /// Whether `who` may `need` on `namespace`, anonymous-read policies included.
    pub async fn allows(&self, who: &Principal, need: Need, namespace: &str) -> ApiResult<bool> {
        if !self.enabled || who.may(need, namespace) {
            return Ok(true);
        }
        Ok(need == Need::Read
            && self
                .anonymous_namespaces()
                .await?
                .iter()
                .any(|n| n == namespace))
    }

    /// The refusal for `who` lacking `need` on `namespace`.
    pub fn refusal(who: &Principal, need: Need, namespace: &str) -> ApiError {
        match who {
            Principal::Anonymous => ApiError::unauthenticated(format!(
                "a token is required to {} namespace {namespace:?}: set PATCHPORT_TOKEN",
                need.verb()
            )),
            Principal::Token {
                id,
                namespace: own,
                scope,
            } => ApiError::denied(format!(
                "token {id} (scope {} on {own:?}) may not {} namespace {namespace:?}",
                scope.as_str(),
                need.verb()
            )),
            Principal::Bootstrap | Principal::Internal => ApiError::denied(format!(
                "{} may not {} namespace {namespace:?}",
                who.actor(),
                need.verb()
            )),
        }
    }

    /// Requires `need` on `namespace` of a resolved caller.
    pub async fn require(&self, who: &Principal, need: Need, namespace: &str) -> ApiResult<()> {
        if self.allows(who, need, namespace).await? {
            Ok(())
        } else {
            Err(Self::refusal(who, need, namespace))
        }
    }

    /// Requires admin on every namespace (anything goes with auth off).
    pub fn require_global_admin(&self, who: &Principal) -> ApiResult<()> {
        if who.is_global_admin() || !self.enabled {
            Ok(())
        } else {
            Err(Self::refusal(who, Need::Admin, "*"))
        }
    }

    /// Resolves the caller and requires `need` on `namespace`.
    pub async fn check(
        &self,
        md: &MetadataMap,
        need: Need,
        namespace: &str,
    ) -> ApiResult<Principal> {
        let who = self.principal(md).await?;
        self.require(&who, need, namespace).await?;
        Ok(who)
    }

    /// Resolves the caller and requires `need` on at least one namespace (uploads: a
    /// pusher of any namespace or a worker may upload blobs; the version push that uses
    /// them is checked on its own namespace).
    pub async fn check_somewhere(&self, md: &MetadataMap, need: Need) -> ApiResult<Principal> {
        let who = self.principal(md).await?;
        if self.may_somewhere(&who, need) {
            Ok(who)
        } else {
            Err(Self::refusal(&who, need, "*"))
        }
    }

    /// Whether a resolved caller has `need` on at least one namespace (see
    /// [`Self::check_somewhere`]).
    pub fn may_somewhere(&self, who: &Principal, need: Need) -> bool {
        if !self.enabled {
            return true;
        }
        match (who, need) {
            (Principal::Anonymous, _) => false,
            (Principal::Bootstrap | Principal::Internal, _) => true,
            (Principal::Token { scope, .. }, Need::Push) => {
                matches!(scope, Scope::Push | Scope::Admin | Scope::Worker)
            }
            (Principal::Token { namespace, .. }, n) => who.may(n, namespace),
        }
    }

    /// Requires the worker scope.
    pub async fn check_worker(&self, md: &MetadataMap) -> ApiResult<Principal> {
        self.check(md, Need::Worker, "*").await
    }

    /// Of `digests`, the blobs `who` may see: read, stat, skip uploading and reference
    /// in a version it pushes. A blob is visible through any base or patch version (a
    /// file or an eval set) or port artifact that holds it in a namespace `who` may read,
    /// or when a namespace `who`'s token is scoped to uploaded it (proved it holds the
    /// bytes); callers that read every namespace see every blob. Whether a blob is stored
    /// is not looked at: an invisible blob is answered as if it were missing.
    ///
    /// The one authorisation of blob access by digest: every RPC that reads, stats or
    /// references blobs goes through this (or [`Self::require_blob_read`]).
    pub async fn visible_blobs(
        &self,
        who: &Principal,
        digests: &[patchport_core::Digest],
    ) -> ApiResult<HashSet<patchport_core::Digest>> {
        if !self.enabled || who.may(Need::Read, "*") {
            return Ok(digests.iter().copied().collect());
        }
        let by_text: HashMap<String, patchport_core::Digest> =
            digests.iter().map(|d| (d.to_string(), *d)).collect();
        let keys: Vec<String> = by_text.keys().cloned().collect();
        let holders = self.meta.blob_holders(&keys).await?;
        let mut readable: HashMap<String, bool> = HashMap::new();
        let mut visible = HashSet::new();
        for h in holders {
            let Some(digest) = by_text.get(&h.digest) else {
                continue;
            };
            if visible.contains(digest) {
                continue;
            }
            let sees = if h.uploaded {
                // Uploads are seen by the uploading namespace's own tokens only, never
                // through an anonymous-read policy (no version publishes them yet).
                who.may(Need::Read, &h.holder)
            } else {
                let ns = namespace_of(&h.holder).to_owned();
                match readable.get(&ns) {
                    Some(r) => *r,
                    None => {
                        let r = self.allows(who, Need::Read, &ns).await?;
                        readable.insert(ns, r);
                        r
                    }
                }
            };
            if sees {
                visible.insert(*digest);
            }
        }
        Ok(visible)
    }

    /// Whether `who` may see one blob (see [`Self::visible_blobs`]).
    pub async fn may_read_blob(
        &self,
        who: &Principal,
        digest: &patchport_core::Digest,
    ) -> ApiResult<bool> {
        Ok(self
            .visible_blobs(who, std::slice::from_ref(digest))
            .await?
            .contains(digest))
    }

    /// Resolves the caller and requires that it may read the blob: ReadBlob and every
    /// other RPC that streams a blob's bytes by digest. The refusal is the same whether or
    /// not the blob exists.
    pub async fn require_blob_read(
        &self,
        md: &MetadataMap,
        digest: &patchport_core::Digest,
    ) -> ApiResult<Principal> {
        let who = self.principal(md).await?;
        if self.may_read_blob(&who, digest).await? {
            return Ok(who);
        }
        Err(Self::blob_refusal(&who, digest))
    }

    /// The refusal of a blob `who` may not see.
    pub fn blob_refusal(who: &Principal, digest: &patchport_core::Digest) -> ApiError {
        match who {
            Principal::Anonymous => ApiError::unauthenticated(format!(
                "a token is required to read blob {digest}: set PATCHPORT_TOKEN"
            )),
            other => ApiError::denied(format!(
                "{} may not read blob {digest}: no version it may read holds it",
                other.actor()
            )),
        }
    }

    /// Whose upload sessions `who` starts and may resume, and which namespace an upload
    /// it commits proves possession for: its token's namespace; `None` for callers that
    /// see every blob (auth off, the bootstrap and in-process workers, `*` tokens and the
    /// worker scope), whose uploads need no proof.
    pub fn upload_owner(&self, who: &Principal) -> Option<String> {
        if !self.enabled || who.may(Need::Read, "*") {
            return None;
        }
        Some(match who {
            Principal::Token { namespace, .. } => namespace.clone(),
            // Never an uploader with auth on; a key no namespace can have.
            other => format!("*{}", other.actor()),
        })
    }

    /// Records that `who` uploaded the blob (its namespace now sees it); nothing for
    /// callers that see every blob.
    pub async fn record_upload(
        &self,
        who: &Principal,
        digest: &patchport_core::Digest,
    ) -> ApiResult<()> {
        if let Some(namespace) = self.upload_owner(who) {
            self.meta
                .record_blob_owner(&digest.to_string(), &namespace, now_millis())
                .await?;
        }
        Ok(())
    }

    /// Takes a place for one more long-lived stream of `who` (per caller: a token, the
    /// bootstrap admin, an anonymous caller by address, a worker-scope token per
    /// connection; the in-process workers are not capped), or refuses with
    /// RESOURCE_EXHAUSTED naming the limit and its flag.
    pub(crate) fn open_stream(
        &self,
        who: &Principal,
        remote: Option<std::net::SocketAddr>,
        kind: StreamKind,
        max: usize,
    ) -> ApiResult<Option<StreamPermit>> {
        let caller = match who {
            Principal::Internal => return Ok(None),
            Principal::Anonymous => match remote {
                Some(addr) => format!("anonymous caller {}", addr.ip()),
                None => "anonymous caller".to_owned(),
            },
            Principal::Bootstrap => "the bootstrap admin".to_owned(),
            // Many worker processes share one worker token (one Secret): each
            // connection is a caller of its own.
            Principal::Token {
                id,
                scope: Scope::Worker,
                ..
            } => match remote {
                Some(addr) => format!("worker token {id} at {addr}"),
                None => format!("worker token {id}"),
            },
            Principal::Token { id, .. } => format!("token {id}"),
        };
        self.streams.open(kind, &caller, max).map(Some)
    }

    /// Takes one version push from `who`'s budget (tokens only; auth off has no budget).
    pub fn take_push(&self, who: &Principal) -> ApiResult<()> {
        if !self.enabled {
            return Ok(());
        }
        let key = who.actor();
        self.pushes.check_key(&key).map_err(|not_until| {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ));
            ApiError::exhausted(format!(
                "push rate limit exceeded for {key}: at most {} version pushes per minute; retry in {:.1} s",
                self.push_rate,
                wait.as_secs_f64()
            ))
        })
    }

    /// The audit row of a change that is about to be made: the store writes it in the
    /// change's own transaction (outcome `ok`), so a change never lacks its row.
    pub fn entry(
        &self,
        who: &Principal,
        action: &str,
        target: &str,
        namespace: &str,
        detail: &str,
    ) -> AuditRecord {
        AuditRecord {
            id: 0,
            at: now_millis(),
            actor: who.actor(),
            action: action.to_owned(),
            target: target.to_owned(),
            namespace: namespace.to_owned(),
            outcome: "ok".to_owned(),
            detail: detail.to_owned(),
        }
    }

    /// Records a refused state-changing call in the audit log (a successful one was
    /// recorded in its own transaction, see [`Auth::entry`]). A refusal changed nothing,
    /// so a failure to record it is logged, not returned.
    pub async fn audit_refusal<T>(
        &self,
        who: &Principal,
        action: &str,
        target: &str,
        namespace: &str,
        outcome: &ApiResult<T>,
        detail: &str,
    ) {
        let Err(refusal) = outcome else {
            return;
        };
        let entry = AuditRecord {
            outcome: format!("{:?}", refusal.kind().code()),
            ..self.entry(who, action, target, namespace, detail)
        };
        if let Err(e) = self.meta.insert_audit(&entry).await {
            tracing::error!(error = %e, action, target, "writing the audit log failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    async fn store() -> (tempfile::TempDir, Arc<dyn MetadataStore>) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("meta.db").display());
        let meta = patchport_store::meta::connect(&url).await.unwrap();
        (dir, meta)
    }

    fn on() -> AuthConfig {
        AuthConfig {
            enabled: true,
            ..AuthConfig::default()
        }
    }

    fn bearer_md(token: &str) -> MetadataMap {
        let mut md = MetadataMap::new();
        md.insert("authorization", format!("Bearer {token}").parse().unwrap());
        md
    }

    #[tokio::test]
    async fn token_cache_stays_bounded_under_made_up_ids() {
        let (_dir, meta) = store().await;
        let auth = Auth::new(&on(), meta.clone());
        let (record, secret) = mint_token("acme", Scope::Push, "", "test", None);
        meta.insert_token(
            &record,
            &auth.entry(&Principal::Bootstrap, "CreateToken", "", "*", ""),
        )
        .await
        .unwrap();
        for i in 0..(MISS_CACHE_CAPACITY * 3) {
            let fake = format!("pp_{i:016x}_{}", "0".repeat(64));
            let e = auth.principal(&bearer_md(&fake)).await.unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Unauthenticated);
        }
        let (found, missing) = auth.token_cache_len();
        assert_eq!(found, 0);
        assert_eq!(missing, MISS_CACHE_CAPACITY, "misses are bounded");
        // A real token is still found (and cached) after the flood.
        let who = auth.principal(&bearer_md(&secret)).await.unwrap();
        assert_eq!(who.actor(), record.id);
        assert_eq!(auth.token_cache_len().0, 1);
    }

    #[tokio::test]
    async fn a_poisoned_cache_lock_fails_no_later_request() {
        let (_dir, meta) = store().await;
        let auth = Auth::new(&on(), meta.clone());
        let (record, secret) = mint_token("acme", Scope::Read, "", "test", None);
        meta.insert_token(
            &record,
            &auth.entry(&Principal::Bootstrap, "CreateToken", "", "*", ""),
        )
        .await
        .unwrap();
        // A panic while each lock is held poisons it.
        let (tokens, anonymous) = (auth.tokens.clone(), auth.anonymous.clone());
        let poisoned = std::thread::spawn(move || {
            let _t = tokens.lock();
            let _a = anonymous.lock();
            panic!("a panic while the auth caches are locked");
        })
        .join();
        assert!(poisoned.is_err());
        assert!(auth.tokens.is_poisoned() && auth.anonymous.is_poisoned());
        // Every later request is still answered.
        let who = auth.principal(&bearer_md(&secret)).await.unwrap();
        assert!(auth.allows(&who, Need::Read, "acme").await.unwrap());
        assert!(!auth.allows(&who, Need::Read, "other").await.unwrap());
        auth.forget(&record.id);
        auth.forget_policies();
        auth.principal(&bearer_md(&secret)).await.unwrap();
    }

    fn scope() -> impl Strategy<Value = Scope> {
        prop_oneof![
            Just(Scope::Read),
            Just(Scope::Push),
            Just(Scope::Admin),
            Just(Scope::Worker)
        ]
    }

    fn need() -> impl Strategy<Value = Need> {
        prop_oneof![
            Just(Need::Read),
            Just(Need::Push),
            Just(Need::Admin),
            Just(Need::Worker)
        ]
    }

    proptest! {
        #[test]
        fn token_parsers_never_panic(s in "\\PC{0,200}") {
            let _ = bearer(&s);
            let _ = split_token(&s);
            let _ = Scope::parse(&s);
        }

        #[test]
        fn minted_tokens_split_back(id in "[0-9a-f]{16}", secret in "[0-9a-f]{64}") {
            let token = format!("pp_{id}_{secret}");
            prop_assert_eq!(split_token(&token), Some((id.as_str(), secret.as_str())));
            let header = format!("Bearer {token}");
            prop_assert_eq!(bearer(&header), Some(token.as_str()));
        }

        #[test]
        fn malformed_tokens_do_not_split(
            id in "[0-9a-fA-F]{0,20}",
            secret in "[0-9a-fA-F_]{0,70}",
        ) {
            let token = format!("pp_{id}_{secret}");
            let well_formed = id.len() == 16 && secret.len() == 64 && !secret.contains('_');
            prop_assert_eq!(split_token(&token).is_some(), well_formed);
        }

        #[test]
        fn scopes_round_trip(s in scope()) {
            prop_assert_eq!(Scope::parse(s.as_str()).unwrap(), s);
        }

        #[test]
        fn a_token_never_reaches_past_its_namespace(
            own in "[a-z]{1,3}",
            other in "[a-z]{1,3}",
            s in scope(),
            n in need(),
        ) {
            let who = Principal::Token { id: "t".into(), namespace: own.clone(), scope: s };
            if other != own && n != Need::Worker {
                // Only reading, and only by the worker scope, crosses namespaces.
                prop_assert_eq!(
                    who.may(n, &other),
                    n == Need::Read && s == Scope::Worker
                );
            }
            // Scopes nest: admin may what push may, push what read may (on its own
            // namespace).
            if s != Scope::Worker && n != Need::Worker && who.may(n, &own) {
                let wider = |w: Scope| Principal::Token {
                    id: "t".into(),
                    namespace: own.clone(),
                    scope: w,
                };
                prop_assert!(wider(Scope::Admin).may(n, &own));
                if s == Scope::Read {
                    prop_assert!(wider(Scope::Push).may(n, &own));
                }
            }
            // Nobody but a `*` token or the bootstrap is a global admin.
            prop_assert!(!who.is_global_admin());
            prop_assert!(!Principal::Anonymous.may(n, &own));
        }
    }
}
