-- Signatures the registry made: OpenSSF Model Signing bundles (`model.sig`) of versions
-- and port artifacts, and the signed provenance (a DSSE envelope) of port artifacts.
CREATE TABLE signatures (
    -- `base:ns/name:version`, `patch:ns/name:version`, or `port:<port id>:adapter|merged`
    subject    TEXT PRIMARY KEY,
    -- The Sigstore bundle JSON (model.sig), byte for byte as served.
    model_sig  TEXT NOT NULL,
    -- The provenance envelope JSON (provenance.json), for port artifacts.
    provenance TEXT,
    -- The signing key's hint: hex sha256 of its public key PEM.
    key_hint   TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

-- `resolve` returns only signed artifacts, whatever the caller asks.
ALTER TABLE namespace_policies ADD COLUMN require_signed BIGINT NOT NULL DEFAULT 0;
