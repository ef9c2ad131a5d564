-- One row per retention run over the shared_queue archives: what was pruned, and when.
CREATE TABLE prune_runs (
    id             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ran_at         timestamptz NOT NULL DEFAULT now(),
    retention_days integer     NOT NULL CHECK (retention_days > 0),
    queue          text        NOT NULL,
    pruned         bigint      NOT NULL CHECK (pruned >= 0)
);
