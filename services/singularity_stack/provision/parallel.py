"""Running independent SQL tasks on a few connections at once, within the connection budget's headroom.

Each worker thread opens one autocommit connection to the given database when it takes its first task and keeps
it for the next; all are closed when the batch ends. At most `workers` connections are open at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import psycopg

T = TypeVar("T")
Task = Callable[[psycopg.Connection], T]


def on_connections(dsn: str, tasks: Sequence[Task[T]], workers: int, name: str = "provision") -> list[T]:
    """Each task's result, in the tasks' order. The first task to fail (in that order) is raised once the
    tasks already running have ended; tasks not yet started are not started."""
    if not tasks:
        return []
    local = threading.local()
    opened: list[psycopg.Connection] = []
    lock = threading.Lock()

    def run(task: Task[T]) -> T:
        conn: psycopg.Connection | None = getattr(local, "conn", None)
        if conn is None or conn.closed:
            conn = psycopg.connect(dsn, autocommit=True)
            with lock:
                opened.append(conn)
            local.conn = conn
        return task(conn)

    pool = ThreadPoolExecutor(max_workers=max(1, min(workers, len(tasks))), thread_name_prefix=name)
    try:
        futures: list[Future[T]] = [pool.submit(run, task) for task in tasks]
        results = []
        for future in futures:
            try:
                results.append(future.result())
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        return results
    finally:
        pool.shutdown(wait=True)
        for conn in opened:
            conn.close()
