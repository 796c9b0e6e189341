-- Ports: a patch version carried onto a base version, with its artifacts and diagnostics.

CREATE TABLE ports (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,
    patch_id           BIGINT NOT NULL REFERENCES patch_versions (id),
    base_id            BIGINT NOT NULL REFERENCES base_versions (id),
    source_base_id     BIGINT NOT NULL REFERENCES base_versions (id),
    method_version     TEXT NOT NULL,
    state              TEXT NOT NULL,
    refusals_json      TEXT NOT NULL,
    diagnostics_json   TEXT,
    adapter_files_json TEXT NOT NULL,
    merged_files_json  TEXT NOT NULL,
    attempts           BIGINT NOT NULL,
    error              TEXT,
    queued_at          BIGINT NOT NULL,
    started_at         BIGINT,
    finished_at        BIGINT,
    UNIQUE (patch_id, base_id, method_version)
);
CREATE INDEX ports_base ON ports (base_id);
