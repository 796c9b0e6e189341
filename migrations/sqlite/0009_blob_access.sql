-- Who may reference or read a blob by its digest (issue #14), each keyed by digest:
--
-- blob_owners: the namespaces that proved they hold a blob's bytes by uploading them (a
-- token of the namespace committed an upload of it). Until a version holds the blob,
-- this is what lets the namespace's tokens see and reference it.
CREATE TABLE blob_owners (
    digest     TEXT NOT NULL,
    namespace  TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (digest, namespace)
);

-- port_artifact_blobs: every blob a port's artifacts name (whole files and the pieces of
-- composed files), written when the port completes; replaces a LIKE scan over every
-- port's artifact JSON.
CREATE TABLE port_artifact_blobs (
    digest  TEXT NOT NULL,
    port_id BIGINT NOT NULL REFERENCES ports (id),
    PRIMARY KEY (digest, port_id)
);
CREATE INDEX port_artifact_blobs_port ON port_artifact_blobs (port_id);

-- Eval sets are readable through the patch versions that hold them.
CREATE INDEX patch_versions_eval_digest ON patch_versions (eval_digest);

-- Ports completed before this migration: every "digest" member of their artifacts.
INSERT OR IGNORE INTO port_artifact_blobs (digest, port_id)
SELECT DISTINCT t.value, o.id FROM ports o, json_tree(o.adapter_files_json) t
WHERE t.key = 'digest' AND t.type = 'text'
UNION
SELECT DISTINCT t.value, o.id FROM ports o, json_tree(o.merged_files_json) t
WHERE t.key = 'digest' AND t.type = 'text';
