-- depends: 0002.agents-tasks-steps
-- processed_messages is keyed by sender too (sharedqueue/idempotency.py). Replies carry no vouched
-- sender (only Nexus and Genesis may send to an instance's reply queues), so they keep sender ''.
ALTER TABLE processed_messages ADD COLUMN sender text NOT NULL DEFAULT '';
ALTER TABLE processed_messages DROP CONSTRAINT processed_messages_pkey,
    ADD PRIMARY KEY (queue, sender, request_id);
