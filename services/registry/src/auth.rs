//! Who is calling and what they may do: bearer tokens with a scope on a namespace, the
//! bootstrap admin token, anonymous reads per namespace, the push rate limit, and the
//! audit log of every state change.
//!
//! A token is `pp_<id>_<secret>`: the id is public (listed, audited), the secret is 32
//! random bytes shown once; the store keeps only `sha256(secret)`. Token records are
//! cached for [`CACHE_TTL`], so a revocation reaches every replica within that time (at
//! once on the replica that revoked it).
//!
//! Checks run before any lookup, on the namespace named in the request, so a refusal
//! never tells whether a private name exists.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use patchport_store::meta::{AuditRecord, MetadataStore, TokenRecord, now_millis};
use sha2::{Digest as _, Sha256};
use tonic::metadata::MetadataMap;

use crate::error::{ApiError, ApiResult};

/// How long a token record or the anonymous-namespace list is trusted from cache.
pub const CACHE_TTL: Duration = Duration::from_secs(5);

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

/// Token records by id, with the time they were read.
type TokenCache = HashMap<String, (Instant, Option<TokenRecord>)>;

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

/// `pp_<id>_<secret>` split into its id and secret.
fn split_token(token: &str) -> Option<(&str, &str)> {
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
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or_else(|| {
                ApiError::unauthenticated(
                    "malformed authorization metadata: expected `Bearer <token>`",
                )
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
        if let Some((at, rec)) = self.tokens.lock().expect("token cache").get(id)
            && at.elapsed() < CACHE_TTL
        {
            return Ok(rec.clone());
        }
        let rec = self.meta.get_token(id).await?;
        self.tokens
            .lock()
            .expect("token cache")
            .insert(id.to_owned(), (Instant::now(), rec.clone()));
        Ok(rec)
    }

    /// Drops a token from this replica's cache (after a revocation).
    pub fn forget(&self, id: &str) {
        self.tokens.lock().expect("token cache").remove(id);
    }

    /// Drops the cached anonymous-read namespaces (after a policy change).
    pub fn forget_policies(&self) {
        *self.anonymous.lock().expect("policy cache") = None;
    }

    async fn anonymous_namespaces(&self) -> ApiResult<Vec<String>> {
        if let Some((at, list)) = &*self.anonymous.lock().expect("policy cache")
            && at.elapsed() < CACHE_TTL
        {
            return Ok(list.clone());
        }
        let list = self.meta.anonymous_namespaces().await?;
        *self.anonymous.lock().expect("policy cache") = Some((Instant::now(), list.clone()));
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

    /// Whether `who` may read a blob: through any version or port that holds it.
    pub async fn may_read_blob(&self, who: &Principal, digest: &str) -> ApiResult<bool> {
        if !self.enabled || who.may(Need::Read, "*") {
            return Ok(true);
        }
        for name in self.meta.names_holding_blob(digest).await? {
            if self.allows(who, Need::Read, namespace_of(&name)).await? {
                return Ok(true);
            }
        }
        Ok(false)
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
