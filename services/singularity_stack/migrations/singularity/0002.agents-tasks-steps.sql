-- depends: 0001.processed-messages
-- A Singularity instance's private state: its agents, their tasks, each task's steps (one per
-- request sent through the shared queue, with the reply once it came), human decisions, and cost.

CREATE TABLE agents (
    id            text        PRIMARY KEY,
    created_at    timestamptz NOT NULL DEFAULT now(),
    llm_calls     integer     NOT NULL DEFAULT 0,
    llm_cost_usd  numeric(16, 8) NOT NULL DEFAULT 0
);

CREATE TABLE tasks (
    id             uuid        PRIMARY KEY,
    agent_id       text        NOT NULL REFERENCES agents (id),
    description    text        NOT NULL,
    language       text        NOT NULL,
    files          jsonb       NOT NULL DEFAULT '{}',
    state          text        NOT NULL DEFAULT 'pending'
                   CHECK (state IN ('pending', 'running', 'succeeded', 'failed')),
    phase          text,
    result         jsonb,
    failure_reason text,
    cost_usd       numeric(16, 8) NOT NULL DEFAULT 0,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tasks_unfinished ON tasks (created_at) WHERE state IN ('pending', 'running');

CREATE TABLE steps (
    task_id     uuid        NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    seq         integer     NOT NULL,
    phase       text        NOT NULL,
    kind        text        NOT NULL CHECK (kind IN ('llm', 'job', 'approval', 'question')),
    request_id  uuid        NOT NULL UNIQUE,
    state       text        NOT NULL DEFAULT 'waiting'
                CHECK (state IN ('waiting', 'done', 'failed', 'expired')),
    request     jsonb       NOT NULL,
    reply       jsonb,
    model       text,
    cost_usd    numeric(16, 8) NOT NULL DEFAULT 0,
    error       text,
    deadline    timestamptz NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    PRIMARY KEY (task_id, seq)
);
CREATE INDEX steps_llm_recent ON steps (started_at) WHERE kind = 'llm';

CREATE TABLE decisions (
    request_id  uuid        PRIMARY KEY REFERENCES steps (request_id),
    task_id     uuid        NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    kind        text        NOT NULL CHECK (kind IN ('approval', 'answer')),
    approved    boolean,
    reason      text,
    response    text,
    decided_by  text,
    decided_at  timestamptz NOT NULL DEFAULT now()
);
