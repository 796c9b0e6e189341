-- What a subscriber needs without a follow-up call (digests, state, refusal kinds, risk,
-- a diagnostics summary), written with the event in the same transaction.
ALTER TABLE events ADD COLUMN payload_json TEXT;
-- The queue order: priority first, then first in first out.
CREATE INDEX jobs_queue_order ON jobs (state, priority DESC, id);
