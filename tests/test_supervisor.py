"""`up`'s supervisor restarts dead services with a CrashLoopBackOff-like back-off (fake processes, fake clock)."""

from __future__ import annotations

from pathlib import Path

from singularity_stack.local.supervisor import (
    MAX_RESTART_BACKOFF_S,
    STABLE_RUN_S,
    ServiceProcess,
    Supervisor,
    restart_delay,
)


class FakeService(ServiceProcess):
    """A service whose process is a flag: start() makes it run, die() makes it exit."""

    def __init__(self, name: str) -> None:
        super().__init__(name, "nexus", {}, 0, Path("/dev/null"))
        self.code: int | None = None

    def start(self) -> None:
        self.code = None

    def die(self) -> None:
        self.code = 1

    def exited(self) -> int | None:
        return self.code


def test_restart_delays_double_up_to_a_cap() -> None:
    assert [restart_delay(n) for n in range(5)] == [0.0, 5.0, 10.0, 20.0, 40.0]
    assert restart_delay(30) == MAX_RESTART_BACKOFF_S


def test_a_crash_looping_service_backs_off_and_a_stable_one_restarts_at_once() -> None:
    now = [1000.0]
    service = FakeService("nexus")
    messages: list[str] = []
    supervisor = Supervisor([service], messages.append, clock=lambda: now[0])
    service.started_at = now[0]

    def crash_and_wait_for_restart() -> float:
        """Kill the service, then advance the clock a second at a time until it is started again."""
        service.die()
        died_at = now[0]
        supervisor.watch_once()
        while service.exited() is not None:
            now[0] += 1
            supervisor.watch_once()
        return now[0] - died_at

    now[0] += 2  # dies 2 s after starting: a short run
    assert crash_and_wait_for_restart() == 5
    now[0] += 2
    assert crash_and_wait_for_restart() == 10
    now[0] += 2
    assert crash_and_wait_for_restart() == 20
    now[0] += STABLE_RUN_S  # then it ran fine for a minute: the next death restarts it at once
    assert crash_and_wait_for_restart() == 0
    assert service.restarts == 4
    assert "restarting in 20s (3 short runs in a row)" in messages[2]
