-- depends: 0003.processed-messages-sender
-- A step is identified by (phase, name), stable across versions of the workflow, not by its seq
-- (a counter that shifts when a newer workflow adds, removes or reorders a step); seq stays as the
-- order the steps were recorded in, for display.
--
-- Backfill: before names, the workflow (singularity/workflow.py) sent, in this order,
--   specification: question (if the task was vague) then llm;  pseudocode: llm;  architecture: llm;
--   refinement: llm (the code), then job, llm (a fix), job, ... ;  completion: llm (review), approval.
-- So a row's name follows from its phase and kind, and in refinement from how many jobs the task
-- had sent up to it: a job is validate-round-<jobs so far, itself included>, an llm after n jobs is
-- fix-round-<n>, the llm before any job is code. These are the names workflow.py gives those steps.
-- A row of no known shape keeps its seq in its name, so it stays unique and matches no new step.
ALTER TABLE steps ADD COLUMN name text;

UPDATE steps SET name = named.name
FROM (
    SELECT task_id, seq,
           CASE
               WHEN phase = 'specification' AND kind = 'question' THEN 'clarify'
               WHEN phase = 'specification' AND kind = 'llm' THEN 'specification'
               WHEN phase = 'pseudocode' AND kind = 'llm' THEN 'pseudocode'
               WHEN phase = 'architecture' AND kind = 'llm' THEN 'architecture'
               WHEN phase = 'refinement' AND kind = 'job' THEN 'validate-round-' || jobs
               WHEN phase = 'refinement' AND kind = 'llm' AND jobs = 0 THEN 'code'
               WHEN phase = 'refinement' AND kind = 'llm' THEN 'fix-round-' || jobs
               WHEN phase = 'completion' AND kind = 'llm' THEN 'review'
               WHEN phase = 'completion' AND kind = 'approval' THEN 'approval'
               ELSE 'seq-' || seq
           END AS name
    FROM (
        SELECT task_id, seq, phase, kind,
               count(*) FILTER (WHERE phase = 'refinement' AND kind = 'job')
                   OVER (PARTITION BY task_id ORDER BY seq) AS jobs
        FROM steps
    ) AS counted
) AS named
WHERE steps.task_id = named.task_id AND steps.seq = named.seq;

ALTER TABLE steps ALTER COLUMN name SET NOT NULL,
    ADD CONSTRAINT steps_identity UNIQUE (task_id, phase, name);
