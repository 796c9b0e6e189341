-- Queries at scale: listings by namespace and compat by base read an index range and
-- page by key instead of scanning every version.
-- The namespace of a version (`namespace` of `namespace/name`), kept by the database.
ALTER TABLE base_versions ADD COLUMN namespace TEXT GENERATED ALWAYS AS (split_part(name, '/', 1)) STORED;
ALTER TABLE patch_versions ADD COLUMN namespace TEXT GENERATED ALWAYS AS (split_part(name, '/', 1)) STORED;
CREATE INDEX base_versions_listing ON base_versions (namespace, name, id);
CREATE INDEX patch_versions_listing ON patch_versions (namespace, name, id);
-- A page of the patches trained on a base, and of the ports onto a base, oldest first.
CREATE INDEX patch_versions_base_page ON patch_versions (base_id, id);
CREATE INDEX ports_base_page ON ports (base_id, id);
