-- depends: 0001.prune-runs
-- What CentralCloud learned from the shared_queue archives: one report per analytics run.
CREATE TABLE analytics_reports (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    computed_at timestamptz NOT NULL DEFAULT now(),
    report      jsonb       NOT NULL
);
