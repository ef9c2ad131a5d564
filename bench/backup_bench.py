"""Backup and restore bench: the stack's dump and restore scripts (provision/backup.py, what the CronJob and
`singularity-stack backup/restore` run) beside plain pg_dump -Fc / pg_restore --create of the same databases.

    .venv/bin/python bench/backup_bench.py [--admin-dsn DSN] [--tasks 2000] [--messages 20000] [--samples 3]

Without --admin-dsn it starts a throwaway local PostgreSQL (fsync off, as in the tests). The stack (two
instances) gets `--tasks` tasks with a step each and `--messages` queue messages. Rounds are interleaved
(script, plain, script, plain ...; bench/samples.py) and each ratio is taken per round: the script's dump
against pg_dumpall --globals-only + pg_dump per database; its restore (roles from the globals, pg_restore
--create per database, passwords set) against pg_restore --create per database onto the same server.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import psycopg
from psycopg import sql
from samples import interleave, ratio, seconds

from singularity_stack.postgres.installation import find_installation
from singularity_stack.provision import backup
from singularity_stack.provision.deprovision import drop_stack
from singularity_stack.provision.provisioner import Provisioner, ProvisionResult, with_database
from singularity_stack.topology import StackLayout
from singularity_stack_testing.postgres import throwaway_cluster


def fill(result: ProvisionResult, tasks: int, messages: int) -> None:
    with psycopg.connect(result.credentials["singularity_1"].database_url) as conn:
        conn.execute("INSERT INTO agents (id) VALUES ('bench')")
        with conn.cursor() as cur:
            for n in range(tasks):
                task = uuid.uuid4()
                cur.execute(
                    "INSERT INTO tasks (id, agent_id, description, language, state) "
                    "VALUES (%s, 'bench', %s, 'python', 'succeeded')",
                    (task, f"task {n}: write a program that prints a greeting " * 4),
                )
                cur.execute(
                    "INSERT INTO steps (task_id, seq, phase, name, kind, request_id, state, request, deadline) "
                    "VALUES (%s, 1, 'completion', 'approval', 'approval', %s, 'done', %s, now())",
                    (task, uuid.uuid4(), json.dumps({"diff": "+print('hello')\n" * 20})),
                )
    with psycopg.connect(result.credentials["singularity_1"].shared_queue_url) as conn:
        batch = [json.dumps({"n": n, "text": "x" * 200}) for n in range(1000)]
        for _ in range(max(1, messages // 1000)):
            conn.execute("SELECT pgmq.send_batch('llm_requests', %s::jsonb[])", (batch,))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--admin-dsn")
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    cluster = None
    if args.admin_dsn is None:
        cluster = throwaway_cluster()
        cluster.start()
    admin_dsn = args.admin_dsn or cluster.dsn()  # type: ignore[union-attr]
    tools = find_installation().bindir
    layout = StackLayout(2, "bench_backup_")
    work = Path(tempfile.mkdtemp(prefix="backup-bench-"))
    work.chmod(0o755)
    try:
        result = Provisioner(admin_dsn, layout, report=lambda _: None).run()
        fill(result, args.tasks, args.messages)
        libpq = backup.libpq_environment(admin_dsn)
        databases = backup.stack_databases(layout)
        scripted, plain = work / "scripted", work / "plain"
        scripted.mkdir()

        def script_dump() -> None:
            shutil.rmtree(scripted)
            scripted.mkdir()
            backup.run_script(
                backup.dump_script(), {**libpq, **backup.dump_environment(layout, str(scripted), 1)}, tools
            )

        def plain_dump() -> None:
            shutil.rmtree(plain, ignore_errors=True)
            plain.mkdir()
            env = {**libpq}
            run = [str(tools / "pg_dumpall"), "--globals-only", "--no-role-passwords", f"--file={plain}/globals.sql"]
            subprocess.run(run, env={**_env(), **env}, check=True)
            for db in databases:
                command = [str(tools / "pg_dump"), "-Fc", f"--file={plain}/{db}.dump", f"--dbname={db}"]
                subprocess.run(command, env={**_env(), **env}, check=True)

        def script_restore() -> None:
            drop_stack(admin_dsn, layout)
            env = {**libpq, "BACKUP_ROOT": str(scripted), "RESTORE_BACKUP": "latest"}
            backup.run_script(backup.restore_script(), env, tools)
            backup.set_passwords(admin_dsn, result.passwords)

        def plain_restore() -> None:
            with psycopg.connect(admin_dsn, autocommit=True) as conn:
                for db in databases:
                    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db)))
            for db in databases:
                command = [
                    str(tools / "pg_restore"),
                    "--create",
                    "--exit-on-error",
                    "--dbname=postgres",
                    f"{plain}/{db}.dump",
                ]
                subprocess.run(command, env={**_env(), **libpq, "PGDATABASE": "postgres"}, check=True)

        script_dump()
        plain_dump()
        size = sum(p.stat().st_size for p in scripted.rglob("*") if p.is_file())
        print(
            f"stack: {layout.instances} instances, {args.tasks} tasks, {args.messages} queue messages; "
            f"backup {size:,} bytes"
        )
        dumps = interleave({"script": seconds(script_dump), "plain": seconds(plain_dump)}, args.samples, args.warmup)
        print(f"dump, backup script:            {dumps['script'].format('s', '{:.2f}')}")
        print(f"dump, plain pg_dumpall+pg_dump: {dumps['plain'].format('s', '{:.2f}')}")
        print(f"dump ratio script/plain:        {ratio(dumps['script'], dumps['plain']).format(number='{:.2f}')}")
        restores = interleave(
            {"script": seconds(script_restore), "plain": seconds(plain_restore)}, args.samples, args.warmup
        )
        print(f"restore, restore script:        {restores['script'].format('s', '{:.2f}')}")
        print(f"restore, plain pg_restore:      {restores['plain'].format('s', '{:.2f}')}")
        print(f"restore ratio script/plain:     {ratio(restores['script'], restores['plain']).format(number='{:.2f}')}")
        with psycopg.connect(with_database(admin_dsn, layout.database("singularity_1"))) as conn:
            count = conn.execute("SELECT count(*) FROM tasks").fetchone()
        assert count == (args.tasks,), count  # what was restored last is the whole stack
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if cluster is not None:
            cluster.stop("immediate")
            shutil.rmtree(cluster.datadir, ignore_errors=True)


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


if __name__ == "__main__":
    main()
