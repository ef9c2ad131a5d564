-- depends: 0002.analytics
-- Every retention run is one prune_runs row, even one that pruned nothing (pruned = 0); what it took from
-- each queue's archive is in prune_run_queues. Until now a run was a row per queue it pruned, so a run that
-- pruned nothing left no trace; those rows (one transaction's now() as their ran_at) become one run each.
CREATE TABLE prune_run_queues (
    run_id bigint NOT NULL REFERENCES prune_runs (id) ON DELETE CASCADE,
    queue  text   NOT NULL,
    pruned bigint NOT NULL CHECK (pruned > 0),
    PRIMARY KEY (run_id, queue)
);

WITH runs AS (
    SELECT min(id) AS run_id, ran_at, retention_days FROM prune_runs GROUP BY ran_at, retention_days
)
INSERT INTO prune_run_queues (run_id, queue, pruned)
SELECT runs.run_id, p.queue, sum(p.pruned)
FROM prune_runs p JOIN runs USING (ran_at, retention_days)
WHERE p.pruned > 0
GROUP BY runs.run_id, p.queue;

DELETE FROM prune_runs p
WHERE p.id <> (SELECT min(o.id) FROM prune_runs o WHERE o.ran_at = p.ran_at AND o.retention_days = p.retention_days);

UPDATE prune_runs p
SET pruned = coalesce((SELECT sum(q.pruned) FROM prune_run_queues q WHERE q.run_id = p.id), 0);

ALTER TABLE prune_runs DROP COLUMN queue;
COMMENT ON COLUMN prune_runs.pruned IS 'archived messages pruned by the run, over every queue';
