-- depends: 0001.processed-messages
-- Genesis's private data: one row per job it ran, with the verdict and how long each stage took.

CREATE TABLE executions (
    request_id  uuid        PRIMARY KEY,
    instance    text        NOT NULL,
    agent_id    text        NOT NULL,
    language    text        NOT NULL,
    status      text        NOT NULL,
    exit_code   integer,
    lint_count  integer     NOT NULL DEFAULT 0,
    timings_ms  jsonb       NOT NULL DEFAULT '{}',
    stdout_bytes integer    NOT NULL DEFAULT 0,
    stderr_bytes integer    NOT NULL DEFAULT 0,
    finished_at timestamptz NOT NULL DEFAULT now()
);
