"""A local Ray session whose start times out is started once more, in a new folder.

``ray.init`` is replaced by a recorder that raises Ray's own start error as told, so each
attempt's temporary folder and what the session says can be checked without a cluster.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from fam_core.bulk.session import RAY_START_ATTEMPTS, ray_session  # noqa: E402

RAY_TIMEOUT = (
    "The current node timed out during startup. This could happen because some of the raylet "
    "failed to startup or the GCS has become overloaded."
)


class Starts(list):
    """The ``_temp_dir`` of each ``ray.init`` call; the calls raise ``errors`` in turn."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[Exception] = []


@pytest.fixture
def starts(monkeypatch, tmp_path) -> Starts:
    started = Starts()
    errors = started.errors

    def init(**options: object) -> None:
        started.append(Path(str(options["_temp_dir"])))
        assert started[-1].is_dir() and started[-1].parent == tmp_path
        if errors:
            raise errors.pop(0)

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr("fam_core.bulk.session.remove_stale_sessions", lambda root: [])
    return started


def test_a_start_that_timed_out_is_tried_once_more_in_a_new_folder(starts):
    starts.errors.append(Exception(RAY_TIMEOUT))
    said: list[str] = []
    with ray_session(None, 1, said.append) as session:
        assert len(starts) == 2 and session.temp == starts[1]
        assert not starts[0].exists()  # the failed start's folder is gone
    assert said == ["Ray timed out starting; starting it once more"]
    assert not starts[1].exists()


def test_a_second_timeout_is_raised(starts):
    starts.errors.extend(Exception(RAY_TIMEOUT) for _ in range(RAY_START_ATTEMPTS))
    with pytest.raises(Exception, match="timed out during startup"), ray_session(None, 1):
        pytest.fail("the session must not start")
    assert len(starts) == RAY_START_ATTEMPTS
    assert not any(folder.exists() for folder in starts)


def test_other_start_errors_are_raised_at_once(starts):
    starts.errors.append(RuntimeError("address already in use"))
    with pytest.raises(RuntimeError, match="already in use"), ray_session(None, 1):
        pytest.fail("the session must not start")
    assert len(starts) == 1 and not starts[0].exists()
