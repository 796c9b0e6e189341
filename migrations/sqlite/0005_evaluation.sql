-- The quality gate's result for a port (three arms, verdict), as JSON; NULL until a
-- worker evaluated it (or when the patch has no eval set).
ALTER TABLE ports ADD COLUMN evaluation_json TEXT;
