-- Messages this service has handled, keyed by queue kind and request id: a redelivered
-- message finds its row and is not processed twice (see sharedqueue/idempotency.py).
CREATE TABLE processed_messages (
    queue        text        NOT NULL,
    request_id   uuid        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (queue, request_id)
);
