-- Base versions, patch versions, their files, and the per-blob tensor index.

CREATE TABLE base_versions (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    name         TEXT NOT NULL,
    version      TEXT NOT NULL,
    digest       TEXT NOT NULL,
    parent_id    BIGINT REFERENCES base_versions (id),
    state        TEXT NOT NULL DEFAULT 'published',
    yank_reason  TEXT,
    config_json  TEXT NOT NULL,
    model_type   TEXT NOT NULL,
    tensor_count BIGINT NOT NULL,
    total_size   BIGINT NOT NULL,
    created_at   BIGINT NOT NULL,
    UNIQUE (name, version)
);
CREATE INDEX base_versions_digest ON base_versions (digest);
CREATE INDEX base_versions_parent ON base_versions (parent_id);

CREATE TABLE base_files (
    version_id BIGINT NOT NULL REFERENCES base_versions (id),
    path       TEXT NOT NULL,
    digest     TEXT NOT NULL,
    size       BIGINT NOT NULL,
    PRIMARY KEY (version_id, path)
);

CREATE TABLE patch_versions (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    name         TEXT NOT NULL,
    version      TEXT NOT NULL,
    digest       TEXT NOT NULL,
    base_id      BIGINT NOT NULL REFERENCES base_versions (id),
    state        TEXT NOT NULL DEFAULT 'published',
    yank_reason  TEXT,
    adapter_json TEXT NOT NULL,
    peft_type    TEXT NOT NULL,
    tensor_count BIGINT NOT NULL,
    total_size   BIGINT NOT NULL,
    eval_digest  TEXT,
    created_at   BIGINT NOT NULL,
    UNIQUE (name, version)
);
CREATE INDEX patch_versions_digest ON patch_versions (digest);
CREATE INDEX patch_versions_base ON patch_versions (base_id);

CREATE TABLE patch_files (
    version_id BIGINT NOT NULL REFERENCES patch_versions (id),
    path       TEXT NOT NULL,
    digest     TEXT NOT NULL,
    size       BIGINT NOT NULL,
    PRIMARY KEY (version_id, path)
);

-- The tensor index of a safetensors blob, computed once per blob digest.
CREATE TABLE blob_indexes (
    blob_digest  TEXT PRIMARY KEY,
    json_len     BIGINT NOT NULL,
    tensor_count BIGINT NOT NULL
);

CREATE TABLE blob_tensors (
    blob_digest  TEXT NOT NULL REFERENCES blob_indexes (blob_digest),
    ordinal      BIGINT NOT NULL,
    name         TEXT NOT NULL,
    dtype        TEXT NOT NULL,
    shape        TEXT NOT NULL,
    begin_offset BIGINT NOT NULL,
    end_offset   BIGINT NOT NULL,
    digest       TEXT NOT NULL,
    non_finite   BIGINT NOT NULL,
    PRIMARY KEY (blob_digest, ordinal)
);
