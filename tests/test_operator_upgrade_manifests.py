"""The migration Job of an image bump and what the operator reads back from it: pure functions, no cluster."""

from __future__ import annotations

import shutil

from test_pod_security import violations

from singularity_operator import api
from singularity_operator import migration_jobs as mj
from singularity_stack import cli
from singularity_stack.provision import migrations


def test_the_job_runs_the_new_image_s_migrate_as_the_service_s_role():
    spec = api.parse_spec({"image": "stack:1", "singularity": {"image": "stack:2", "replicas": 3}})
    job = mj.migration_job("s", "ns", spec, "singularity_2", "stack:2")
    assert job["metadata"]["name"] == mj.job_name("s", "singularity_2", "stack:2")
    assert job["metadata"]["name"] != mj.job_name("s", "singularity_2", "stack:3")  # each image its own Job
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["image"] == "stack:2" and pod["restartPolicy"] == "Never"
    assert container["args"] == ["migrate", "singularity", "--termination-log", "/dev/termination-log"]
    [env] = container["env"]
    assert env["valueFrom"]["secretKeyRef"] == {"name": "s-singularity-2-db", "key": "DATABASE_URL"}
    # not selected by the instance's Service or Deployment (their selector is its component)
    assert job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "singularity-2-migration"
    assert violations(job["spec"]["template"]) == {}  # the restricted Pod Security Standard, as every stack Pod


def test_job_states():
    assert mj.job_state({}) == mj.JobState()
    complete = {"status": {"conditions": [{"type": "Complete", "status": "True"}], "succeeded": 1}}
    assert mj.job_state(complete).succeeded
    failed = {"status": {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                         "message": "Job has reached the specified backoff limit"}]}}  # fmt: skip
    assert mj.job_state(failed) == mj.JobState(
        failed=True, reason="BackoffLimitExceeded", message="Job has reached the specified backoff limit"
    )


def test_rolled_out_needs_the_image_the_generation_and_every_replica():
    def deployment(image: str, **status: int) -> dict:
        return {
            "metadata": {"generation": 2},
            "spec": {"replicas": 1, "template": {"spec": {"containers": [{"image": image}]}}},
            "status": status,
        }

    done = {"observedGeneration": 2, "updatedReplicas": 1, "availableReplicas": 1}
    assert mj.rolled_out(deployment("b", **done), "b")
    assert not mj.rolled_out(deployment("a", **done), "b")
    assert not mj.rolled_out(deployment("b", **{**done, "observedGeneration": 1}), "b")
    assert not mj.rolled_out(deployment("b", **{**done, "unavailableReplicas": 1}), "b")
    assert not mj.rolled_out(deployment("b", observedGeneration=2, updatedReplicas=1), "b")


def test_the_failure_message_names_the_job_its_reason_the_termination_and_the_log_tail():
    state = mj.JobState(
        failed=True, reason="BackoffLimitExceeded", message="Job has reached the specified backoff limit"
    )
    log = "\n".join(f"line {i}" for i in range(100)) + "\nerror: migrating genesis: column no_such_column\n"
    pod = {"status": {"containerStatuses": [{"state": {"terminated": {"exitCode": 2, "message": "error: x\n"}}}]}}
    message = mj.failure_message("genesis", "stack:bad", "s-genesis-migrate-1", state, mj.terminated_message(pod), log)
    assert message.startswith(
        "genesis: migration Job s-genesis-migrate-1 from image stack:bad failed "
        "(BackoffLimitExceeded: Job has reached the specified backoff limit); exit code 2: error: x; log tail: "
    )
    assert message.endswith("error: migrating genesis: column no_such_column")
    assert "line 81" in message and "line 80" not in message  # the last 20 lines only
    assert mj.failure_message("genesis", "i", "j", state, "", "").endswith("; no log available")


def test_migrate_writes_its_outcome_as_the_termination_message(provision_stack, tmp_path, monkeypatch):
    result = provision_stack(1)
    url = result.credentials["genesis"].database_url
    message = tmp_path / "termination-log"
    assert cli.main(["migrate", "genesis", "--database-url", url, "--termination-log", str(message)]) == 0
    assert message.read_text() == f"last applied {migrations.available_migrations('genesis')[-1]}\n"
    broken = tmp_path / "migrations"
    shutil.copytree(migrations.MIGRATIONS_ROOT, broken)
    (broken / "genesis" / "0099.broken.sql").write_text("SELECT no_such_column FROM pg_class;\n")
    monkeypatch.setattr(migrations, "MIGRATIONS_ROOT", broken)
    assert cli.main(["migrate", "genesis", "--database-url", url, "--termination-log", str(message)]) == 2
    written = message.read_text()
    assert written.startswith("error: migrating genesis:") and "no_such_column" in written
