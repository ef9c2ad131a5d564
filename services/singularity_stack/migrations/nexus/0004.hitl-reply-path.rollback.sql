-- Back to every answer on pgmq.
ALTER TABLE hitl_requests DROP COLUMN reply_path;
