-- Bearer tokens, namespace policies and the audit log.

-- A token is `pp_<id>_<secret>`; only sha256(secret) is kept.
CREATE TABLE tokens (
    id           TEXT PRIMARY KEY,
    secret_hash  TEXT NOT NULL,
    -- A namespace, or '*' for every namespace.
    namespace    TEXT NOT NULL,
    -- read, push, admin, worker
    scope        TEXT NOT NULL,
    description  TEXT NOT NULL,
    created_by   TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT,
    revoked_at   BIGINT
);
CREATE INDEX tokens_namespace ON tokens (namespace);

CREATE TABLE namespace_policies (
    namespace      TEXT PRIMARY KEY,
    anonymous_read BIGINT NOT NULL DEFAULT 0,
    require_pass   BIGINT NOT NULL DEFAULT 0,
    updated_at     BIGINT NOT NULL
);

CREATE TABLE audit_log (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    at        BIGINT NOT NULL,
    actor     TEXT NOT NULL,
    action    TEXT NOT NULL,
    target    TEXT NOT NULL,
    namespace TEXT NOT NULL,
    outcome   TEXT NOT NULL,
    detail    TEXT NOT NULL
);
CREATE INDEX audit_log_namespace ON audit_log (namespace, id);

-- Which versions hold a blob (blob reads are authorised through them).
CREATE INDEX base_files_digest ON base_files (digest);
CREATE INDEX patch_files_digest ON patch_files (digest);
