-- depends: 0001.processed-messages
-- Nexus's private data: the history of LLM calls (model chosen, cost), the human-in-the-loop
-- requests it holds for reviewers, and an append-only audit trail of every human action.

CREATE TABLE llm_calls (
    request_id        uuid        PRIMARY KEY,
    instance          text        NOT NULL,
    agent_id          text        NOT NULL,
    task_type         text        NOT NULL,
    complexity        text,
    complexity_source text,
    model             text,
    provider_model    text,
    cost_usd          numeric(16, 8) NOT NULL DEFAULT 0,
    prompt_tokens     integer     NOT NULL DEFAULT 0,
    completion_tokens integer     NOT NULL DEFAULT 0,
    latency_ms        double precision,
    error             text,
    created_at        timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE hitl_requests (
    request_id  uuid        PRIMARY KEY,
    kind        text        NOT NULL CHECK (kind IN ('approval', 'question')),
    instance    text        NOT NULL,
    agent_id    text        NOT NULL,
    payload     jsonb       NOT NULL,   -- the ApprovalRequest / QuestionRequest as received
    state       text        NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending', 'approved', 'rejected', 'answered', 'expired')),
    received_at timestamptz NOT NULL DEFAULT now(),
    deadline    timestamptz,
    decided_at  timestamptz,
    decided_by  text,
    decision    jsonb
);
CREATE INDEX hitl_pending ON hitl_requests (received_at) WHERE state = 'pending';

CREATE TABLE hitl_audit (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id  uuid        NOT NULL REFERENCES hitl_requests (request_id),
    action      text        NOT NULL CHECK (action IN ('received', 'approved', 'rejected', 'answered', 'expired')),
    actor       text        NOT NULL,
    detail      jsonb       NOT NULL DEFAULT '{}',
    at          timestamptz NOT NULL DEFAULT now()
);
-- The audit trail is append-only, even for Nexus's own role.
CREATE FUNCTION hitl_audit_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'hitl_audit is append-only';
END;
$$;
CREATE TRIGGER hitl_audit_append_only BEFORE UPDATE OR DELETE ON hitl_audit
    FOR EACH ROW EXECUTE FUNCTION hitl_audit_is_append_only();
