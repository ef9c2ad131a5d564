-- depends: 0003.prune-runs-every-run
-- Every queue's depth and oldest-message age at each observation (METRICS_INTERVAL_SECONDS), for the
-- console's charts over time; rows older than QUEUE_SAMPLE_RETENTION_HOURS are deleted as new ones come.
CREATE TABLE queue_samples (
    sampled_at         timestamptz NOT NULL DEFAULT now(),
    queue              text        NOT NULL,
    length             bigint      NOT NULL CHECK (length >= 0),
    visible            bigint      NOT NULL CHECK (visible >= 0),
    oldest_age_seconds integer     CHECK (oldest_age_seconds >= 0),
    total_messages     bigint      NOT NULL CHECK (total_messages >= 0),
    PRIMARY KEY (sampled_at, queue)
);
