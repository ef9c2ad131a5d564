-- depends: 0002.llm-history-hitl
-- A request id belongs to the instance that sent it (vouched by PostgreSQL, see sharedqueue/consumer.py):
-- the same id from two instances is two requests, each handled and answered.
-- Rows from before have sender '': requests queued before senders were recorded are dead-lettered
-- unhandled, so none of them can find such a row again.
ALTER TABLE processed_messages ADD COLUMN sender text NOT NULL DEFAULT '';
ALTER TABLE processed_messages DROP CONSTRAINT processed_messages_pkey,
    ADD PRIMARY KEY (queue, sender, request_id);

ALTER TABLE llm_calls DROP CONSTRAINT llm_calls_pkey, ADD PRIMARY KEY (instance, request_id);
