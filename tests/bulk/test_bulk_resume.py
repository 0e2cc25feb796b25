"""fam bulk killed at named points: what it keeps, what a rerun redoes, what it leaves behind.

Each job runs as ``fam bulk`` in a subprocess that pauses at a named point
(:mod:`fam_core.bulk.pause`: it writes a barrier file and sleeps), so the test kills it at a
known moment, never after a guessed delay. Reruns are compared with an uninterrupted job of
the same images: the same rows, none missing, none twice, heatmaps within float16 rounding.
Each subprocess gets a short temporary folder of its own (``TMPDIR`` and ``RAY_TMPDIR``: Ray's
socket paths must stay short) in which nothing may be left, and no process may still run that
uses it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from serving_helpers import default_sigint_in_children

pytest.importorskip("ray.data")
pq = pytest.importorskip("pyarrow.parquet")

from fam_core.bulk import BulkOptions, decode_heatmap, read_rows, run_bulk  # noqa: E402
from fam_core.bulk.atomic import remove_temporaries, write_atomically  # noqa: E402
from fam_core.bulk.checkpoints import ShardCollector, checkpoint_folder, saved_rows  # noqa: E402
from fam_core.bulk.job import _collect  # noqa: E402
from fam_core.bulk.rows import error_row  # noqa: E402
from fam_core.bulk.sample import write_flower_pngs  # noqa: E402
from fam_core.bulk.session import remove_stale_sessions  # noqa: E402
from fam_core.bulk.stream import RowStream  # noqa: E402
from fam_core.bulk.summary import summarise, write_summary  # noqa: E402

MODEL = "default-classifier"
IMAGES = 80  # and corrupt.png, an error row
SMALL_SHARD = 32  # three shards: 32, 32 and 17 images
ONE_SHARD = 128  # every image in one shard
BATCH = 4
HEATMAP_TOLERANCE = 2e-3  # float16 heatmaps; batched passes of other sizes round differently
ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")


RAY_CPUS = 1  # the local Ray session of the conftest fixture `ray_session`


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("resume") / "images"
    write_flower_pngs(folder, IMAGES)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not a PNG")
    return folder


def _options(images: Path, out: Path, shard_size: int, **other: object) -> BulkOptions:
    return BulkOptions(
        models=(MODEL,), images=str(images), out=str(out), shard_size=shard_size, **other
    )


@pytest.fixture(scope="module")
def reference(ray_session, images, tmp_path_factory) -> dict[tuple[str, str], dict]:
    """The rows of an uninterrupted job, by id and model."""
    out = tmp_path_factory.mktemp("resume-reference") / "out"
    run_bulk(_options(images, out, SMALL_SHARD, batch_size=8), progress=lambda message: None)
    return {(r["id"], r["model"]): r for r in read_rows(out)}


@pytest.fixture
def scratch():
    """A short temporary folder for a subprocess's TMPDIR (Ray's sockets live under it)."""
    folder = Path(tempfile.mkdtemp(prefix="fbt-", dir="/tmp"))
    yield folder
    _end(_processes_using(folder))
    subprocess.run(["rm", "-rf", str(folder)], check=False)
    _barrier(folder).unlink(missing_ok=True)


def _barrier(scratch: Path) -> Path:
    """The file a paused job writes: beside its temporary folder, which must stay empty."""
    return scratch.parent / f"{scratch.name}.barrier"


def _processes_using(folder: Path) -> list[int]:
    """The running processes whose command line names ``folder`` (a Ray session's do)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(folder) in command and state != "Z":
            found.append(int(entry.name))
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _end(pids: list[int]) -> None:
    """SIGKILL ``pids``: the Ray processes a killed job (started by this test) left."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class _Job:
    """``fam bulk`` in a subprocess that pauses at ``point`` (``None``: runs to the end)."""

    def __init__(self, out: Path, images: Path, scratch: Path, shard_size: int, point: str | None):
        self.barrier = _barrier(scratch)
        self.barrier.unlink(missing_ok=True)
        env = {**os.environ, "TMPDIR": str(scratch), "RAY_TMPDIR": str(scratch)}
        env["OMP_NUM_THREADS"] = "1"
        if point is not None:
            env.update(FAM_BULK_PAUSE_AT=point, FAM_BULK_PAUSE_FILE=str(self.barrier))
        self.logs = out.parent / f"{out.name}.{point or 'whole'}.log"
        self.scratch = scratch
        command = [
            *(sys.executable, "-m", "fam_core", "bulk", "--model", MODEL),
            *("--images", str(images), "--out", str(out), "--shard-size", str(shard_size)),
            *("--batch-size", str(BATCH), "--checkpoint-seconds", "0.01", "--num-cpus", "1"),
        ]
        with open(self.logs, "wb") as logs, default_sigint_in_children():
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=logs, stderr=subprocess.STDOUT
            )

    def wait_for_barrier(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.barrier.exists():
            if self.process.poll() is not None:
                pytest.fail(f"the job ended before its pause point:\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                self.kill(signal.SIGKILL)
                pytest.fail(f"the job did not reach its pause point:\n{self.output()[-3000:]}")
            time.sleep(0.05)

    def kill(self, signum: int) -> int:
        self.process.send_signal(signum)
        return self.process.wait(timeout=120)

    def finish(self, timeout: float = 300.0) -> int:
        return self.process.wait(timeout=timeout)

    def output(self) -> str:
        return self.logs.read_text(errors="replace")


def _saved_ids(out: Path) -> set[str]:
    """The images a killed job kept: in whole shards and in checkpoint parts."""
    files = [*(out / "shards").glob("shard-*.parquet"), *(out / "checkpoints").rglob("*.parquet")]
    return {i for file in files for i in pq.read_table(file, columns=["id"])["id"].to_pylist()}


def _assert_same_rows(out: Path, reference: dict, shard_size: int) -> None:
    rows = read_rows(out)
    keys = [(r["id"], r["model"]) for r in rows]
    assert len(keys) == len(set(keys)), "a row written twice"
    assert sorted(keys) == sorted(reference), "rows missing or extra"
    order = sorted(key[0] for key in reference)
    for row, key in zip(rows, keys, strict=True):
        expected = reference[key]
        assert row["shard"] == order.index(row["id"]) // shard_size
        assert (row["error"], row["label"], row["class_index"]) == (
            expected["error"],
            expected["label"],
            expected["class_index"],
        )
        if expected["heatmap"] is None:
            assert row["heatmap"] is None
            continue
        assert row["score"] == pytest.approx(expected["score"], abs=1e-4)
        torch.testing.assert_close(
            decode_heatmap(row), decode_heatmap(expected), atol=HEATMAP_TOLERANCE, rtol=0
        )


def _leftovers(out: Path) -> list[Path]:
    return [
        *out.rglob(".*.tmp"),
        *((out / "checkpoints").iterdir() if (out / "checkpoints").exists() else []),
    ]


# -- killed between checkpoints and shards


def test_a_job_killed_while_writing_a_shard_resumes_from_its_checkpoints(
    ray_session, images, reference, scratch, tmp_path
):
    out = tmp_path / "out"
    job = _Job(out, images, scratch, SMALL_SHARD, "replace shard-00001-of-00003.parquet")
    job.wait_for_barrier()
    pid = job.process.pid
    assert job.kill(signal.SIGKILL) == -signal.SIGKILL
    _end(_processes_using(scratch))  # a killed driver cannot end its Ray: the test does
    deadline = time.monotonic() + 60
    while _processes_using(scratch) and time.monotonic() < deadline:
        time.sleep(0.1)
    (left,) = scratch.glob("fam-ray-*")  # the next local session's start removes it
    assert remove_stale_sessions(scratch) == [left] and list(scratch.iterdir()) == []
    temporary = out / "shards" / f".shard-00001-of-00003.parquet.{pid}.tmp"
    assert temporary.is_file()  # whole, but never renamed
    assert sorted(p.name for p in (out / "shards").glob("*.parquet")) == [
        "shard-00000-of-00003.parquet"
    ]
    saved = _saved_ids(out)
    assert SMALL_SHARD <= len(saved) < IMAGES + 1

    again = run_bulk(
        _options(images, out, SMALL_SHARD, batch_size=BATCH), progress=lambda message: None
    )
    assert again.images_skipped == len(saved) and 0 in again.skipped and 1 in again.written
    sizes = [SMALL_SHARD, SMALL_SHARD, IMAGES + 1 - 2 * SMALL_SHARD]
    assert again.rows == sum(sizes[k] for k in again.written)
    assert _leftovers(out) == []
    _assert_same_rows(out, reference, SMALL_SHARD)


def test_a_job_killed_while_writing_its_summary_keeps_the_previous_one(
    ray_session, images, scratch, tmp_path
):
    out = tmp_path / "out"
    run_bulk(_options(images, out, ONE_SHARD), progress=lambda message: None)
    before = json.loads(write_summary(out).read_text())
    job = _Job(
        out, images, scratch, ONE_SHARD, "replace summary.json"
    )  # every shard written: no Ray
    job.wait_for_barrier()
    pid = job.process.pid
    job.kill(signal.SIGKILL)
    assert json.loads((out / "summary.json").read_text()) == before  # whole, never half written
    assert (out / f".summary.json.{pid}.tmp").is_file()

    rerun = _Job(out, images, scratch, ONE_SHARD, None)
    assert rerun.finish() == 0, rerun.output()[-3000:]
    assert f"{IMAGES + 1} of {IMAGES + 1} images skipped" in rerun.output()
    assert _leftovers(out) == []
    assert (
        json.loads((out / "summary.json").read_text())
        == before
        == {
            MODEL: {
                **summarise(out)[MODEL],
                "mean_heatmap": f"mean-{MODEL}.png",
                "mean_heatmap_images": IMAGES,
            }
        }
    )


# -- stopped by a signal: Ray shut down, nothing left, the rerun goes on


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stopped_job_shuts_ray_down_and_its_rerun_goes_on(
    ray_session, images, reference, scratch, tmp_path, signum
):
    out = tmp_path / "out"
    job = _Job(out, images, scratch, ONE_SHARD, "checkpoint-1")
    job.wait_for_barrier()
    ray_processes = _processes_using(scratch)
    sessions = list(scratch.glob("fam-ray-*/session_*"))
    assert ray_processes and sessions  # Ray runs from the job's own temporary folder
    assert job.kill(signum) == 128 + signum, job.output()[-3000:]
    last = job.output().strip().splitlines()[-1]
    assert last.startswith(f"fam: bulk job stopped by {signum.name}; what came back is saved")
    assert [pid for pid in ray_processes if _running(pid)] == []
    assert _processes_using(scratch) == [] and list(scratch.iterdir()) == []
    saved = _saved_ids(out)
    assert 1 <= len(saved) < IMAGES + 1  # the first checkpoint, and no whole shard

    if signum == signal.SIGTERM:  # the command again, to its end
        rerun = _Job(out, images, scratch, ONE_SHARD, None)
        assert rerun.finish() == 0, rerun.output()[-3000:]
        assert f"{len(saved)} of {IMAGES + 1} images skipped" in rerun.output()
        assert _processes_using(scratch) == [] and list(scratch.iterdir()) == []
    else:
        again = run_bulk(_options(images, out, ONE_SHARD), progress=lambda message: None)
        assert again.images_skipped == len(saved) and again.written == [0]
    assert _leftovers(out) == []
    _assert_same_rows(out, reference, ONE_SHARD)


# -- the pieces, without Ray


def test_checkpoints_fall_on_time_and_are_read_back(tmp_path):
    now = [100.0]
    collector = ShardCollector(tmp_path, {0: 3, 1: 1}, seconds=10.0, clock=lambda: now[0])
    rows = [error_row(f"{name}.png", "m", 0, "") for name in "abc"]
    assert collector.seconds_to_checkpoint() is None
    assert collector.add(rows[1]) is None
    now[0] = 109.5
    assert collector.add(rows[0]) is None and collector.add(rows[0]) is None  # a retried row
    assert collector.seconds_to_checkpoint() == pytest.approx(0.5)  # the oldest row sets it
    now[0] = 110.0
    assert collector.seconds_to_checkpoint() == 0.0
    assert collector.checkpoint() == 2 and collector.seconds_to_checkpoint() is None
    part = checkpoint_folder(tmp_path, 0) / "part-00000.parquet"
    assert pq.read_table(part)["id"].to_pylist() == ["a.png", "b.png"]
    assert collector.checkpoint() == 0  # nothing new: no part
    assert sorted(saved_rows(tmp_path, 0, models=1)) == [("a.png", "m"), ("b.png", "m")]

    restarted = ShardCollector(tmp_path, {0: 3}, seconds=10.0)
    restarted.restore(0, saved_rows(tmp_path, 0, models=1))
    assert restarted.add(rows[0]) is None  # already saved
    assert restarted.add(rows[2]) == 0  # the shard is whole
    assert [r["id"] for r in sorted(restarted.take(0), key=lambda r: r["id"])] == [
        "a.png",
        "b.png",
        "c.png",
    ]


def test_rows_are_saved_on_time_while_no_row_comes_back(tmp_path):
    first, second = (error_row(f"{name}.png", "m", 0, "") for name in "ab")
    part = checkpoint_folder(tmp_path, 0) / "part-00000.parquet"
    seen: dict[str, bool] = {}

    class Batch:
        def __init__(self, rows: list[dict]):
            self.rows = rows

        def to_pylist(self) -> list[dict]:
            return self.rows

    class SlowDataset:  # an actor busy for up to 30 s after its first batch
        def iter_batches(self, **options: object):
            yield Batch([first])
            deadline = time.monotonic() + 30
            while not part.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            seen["saved before the next row"] = part.exists()
            yield Batch([second])

    collector = ShardCollector(tmp_path, {0: 2}, seconds=0.05)
    whole: list[list[dict]] = []
    with RowStream(SlowDataset()) as stream:
        _collect(stream, collector, lambda shard: whole.append(collector.take(shard)))
    assert seen == {"saved before the next row": True}
    assert pq.read_table(part)["id"].to_pylist() == ["a.png"]
    assert [sorted(r["id"] for r in rows) for rows in whole] == [["a.png", "b.png"]]


def test_an_image_saved_for_only_some_models_is_redone(tmp_path):
    collector = ShardCollector(tmp_path, {0: 4}, seconds=1.0)
    collector.add(error_row("a.png", "m1", 0, ""))
    collector.add(error_row("a.png", "m2", 0, ""))
    collector.add(error_row("b.png", "m1", 0, ""))
    collector.checkpoint()
    assert sorted(saved_rows(tmp_path, 0, models=2)) == [("a.png", "m1"), ("a.png", "m2")]


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text('{"old": 1}')

    def half_then_fail(temporary: Path) -> None:
        temporary.write_text('{"ne')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, half_then_fail)
    assert path.read_text() == '{"old": 1}' and sorted(tmp_path.iterdir()) == [path]


def test_temporaries_of_writers_no_longer_running_are_removed(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".shard-00000-of-00001.parquet.{dead.pid}.tmp"
    live = tmp_path / f".summary.json.{os.getppid()}.tmp"  # our parent: still writing
    other = tmp_path / ".notes.tmp"  # not a temporary of ours
    for path in (stale, live, other):
        path.write_bytes(b"x")
    assert remove_temporaries(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])


def test_checkpoint_seconds_must_be_positive(images, tmp_path):
    with pytest.raises(ValueError, match="--checkpoint-seconds must be a number > 0"):
        _options(images, tmp_path, 16, checkpoint_seconds=0)
    assert dataclasses.replace(_options(images, tmp_path, 16), checkpoint_seconds=0.5)
