-- depends: 0002.executions
-- A request id belongs to the instance that sent it (vouched by PostgreSQL, see sharedqueue/consumer.py):
-- the same id from two instances is two jobs, each run and answered.
ALTER TABLE processed_messages ADD COLUMN sender text NOT NULL DEFAULT '';
ALTER TABLE processed_messages DROP CONSTRAINT processed_messages_pkey,
    ADD PRIMARY KEY (queue, sender, request_id);

ALTER TABLE executions DROP CONSTRAINT executions_pkey, ADD PRIMARY KEY (instance, request_id);
