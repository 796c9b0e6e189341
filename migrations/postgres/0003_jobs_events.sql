-- The build service: port jobs (the queue), each port row's job, and the events outbox.

-- One row per unit of port work; two patch versions with identical content share one.
CREATE TABLE jobs (
    id                 BIGSERIAL PRIMARY KEY,
    -- port:<patch digest>:<source base digest>:<target base digest>:<method version>
    job_key            TEXT NOT NULL UNIQUE,
    patch_digest       TEXT NOT NULL,
    source_base_digest TEXT NOT NULL,
    target_base_digest TEXT NOT NULL,
    method_version     TEXT NOT NULL,
    -- queued, running, succeeded, incompatible, failed, cancelled
    state              TEXT NOT NULL,
    priority           BIGINT NOT NULL DEFAULT 0,
    attempts           BIGINT NOT NULL DEFAULT 0,
    max_attempts       BIGINT NOT NULL,
    -- Unix ms: not leased before (retry backoff).
    run_after          BIGINT NOT NULL,
    lease_owner        TEXT,
    lease_expires_at   BIGINT,
    -- Incremented at every lease; every write of an attempt checks it.
    fencing_token      BIGINT NOT NULL DEFAULT 0,
    -- 1 when every port of a running job was cancelled (the worker hears it on heartbeat).
    cancel_requested   BIGINT NOT NULL DEFAULT 0,
    last_error         TEXT,
    created_at         BIGINT NOT NULL,
    updated_at         BIGINT NOT NULL
);
CREATE INDEX jobs_ready ON jobs (state, run_after);
CREATE INDEX jobs_lease ON jobs (state, lease_expires_at);

ALTER TABLE ports ADD COLUMN job_id BIGINT REFERENCES jobs (id);
CREATE INDEX ports_job ON ports (job_id);

-- Transactional outbox. Readers page by (xid, id) below the oldest running transaction,
-- so a transaction that commits late is never skipped.
CREATE TABLE events (
    id         BIGSERIAL PRIMARY KEY,
    xid        xid8 NOT NULL DEFAULT pg_current_xact_id(),
    kind       TEXT NOT NULL,
    subject    TEXT NOT NULL,
    job_id     BIGINT,
    port_id    BIGINT,
    detail     TEXT,
    created_at BIGINT NOT NULL
);
CREATE INDEX events_cursor ON events (xid, id);
