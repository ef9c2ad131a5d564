-- depends: 0003.requests-bound-to-sender
-- The path a held request came by (the migration from NATS): a human's answer, given later, goes back
-- the same way. Requests held before dual operation came on pgmq.
ALTER TABLE hitl_requests ADD COLUMN reply_path text NOT NULL DEFAULT 'pgmq' CHECK (reply_path IN ('pgmq', 'nats'));
