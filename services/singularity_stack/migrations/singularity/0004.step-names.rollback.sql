-- Back to steps identified by seq alone (the workflow before step names).
ALTER TABLE steps DROP CONSTRAINT steps_identity, DROP COLUMN name;
