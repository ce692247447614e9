"""Crash tests: the saga process is SIGKILLed at each step boundary in turn, restarted with a
recovery worker, and must end COMPLETED or COMPENSATED with each effect applied once
(tests/saga_crash_worker.py is the process)."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("saga_crash_worker.py")
SRC = Path(__file__).resolve().parent.parent / "src"


def run(db: Path, mode: str, kill_at: str, refuse: bool) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(WORKER), str(db), mode, kill_at, "1" if refuse else "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(SRC)},
    )


# (where the first process dies, whether the participant refuses the charge)
POINTS = [
    ("before-effect:reserve", False),  # the state says "running", the effect is not done
    ("after-effect:reserve", False),  # the effect is done, the state does not say so
    ("participant:charge", False),  # the command is in the outbox, no reply yet
    ("before-effect:confirm", False),  # the reply was applied, past the pivot
    ("after-effect:confirm", False),
    ("participant:charge", True),  # a refusal will follow: compensation after restart
    ("before-effect:release", True),  # during compensation
    ("after-effect:release", True),
]


@pytest.mark.parametrize(
    ("kill_at", "refuse"), POINTS, ids=[f"{p}{'-refused' if r else ''}" for p, r in POINTS]
)
def test_killed_at_a_step_boundary_the_saga_ends_and_each_effect_happened_once(
    tmp_path: Path, kill_at: str, refuse: bool
) -> None:
    db = tmp_path / "shop.db"
    first = run(db, "start", kill_at, refuse)
    assert first.returncode == -signal.SIGKILL, (first.stdout, first.stderr)
    second = run(db, "recover", "-", refuse)
    assert second.returncode == 0, second.stderr
    status = second.stdout.split()[-1]
    with sqlite3.connect(db) as conn:
        effects = dict(conn.execute("SELECT name, count(*) FROM effects GROUP BY name").fetchall())
        calls = dict(conn.execute("SELECT name, count(*) FROM calls GROUP BY name").fetchall())
        charges = conn.execute("SELECT count(*) FROM charges").fetchone()[0]
        (saved,) = conn.execute("SELECT status FROM msdata_sagas").fetchone()
    assert status == saved
    if refuse:
        assert status == "COMPENSATED"
        assert effects == {"reserve": 1, "release": 1}
        assert charges == 0
    else:
        assert status == "COMPLETED"
        assert effects == {"reserve": 1, "confirm": 1}
        assert charges == 1
    # the step the process died in really ran again (its effect was deduplicated)
    step = kill_at.split(":")[1]
    if kill_at.startswith("after-effect"):
        assert calls[step] == 2


def test_sigterm_mid_step_leaves_the_saga_running_and_it_is_finished_not_compensated(
    tmp_path: Path,
) -> None:
    db = tmp_path / "shop.db"
    first = run(db, "start", "sigterm:confirm", False)
    assert first.returncode == 3, (first.stdout, first.stderr)
    assert first.stdout.split() == ["cancelled", "RUNNING"]
    second = run(db, "recover", "-", False)
    assert second.returncode == 0, second.stderr
    assert second.stdout.split()[-1] == "COMPLETED"
    with sqlite3.connect(db) as conn:
        effects = dict(conn.execute("SELECT name, count(*) FROM effects GROUP BY name").fetchall())
        history = conn.execute("SELECT state FROM msdata_sagas").fetchone()[0]
    assert effects == {"reserve": 1, "confirm": 1}
    assert b"compensating" not in (history if isinstance(history, bytes) else history.encode())
