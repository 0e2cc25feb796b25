"""fam index build on the fam bulk Ray engine, and fam search / fam index info end to end.

A small gallery of the embedded benchmark (class folders, one corrupt file) is indexed once
by the module's local Ray session (two CPUs); the rows are checked against the library's own
embeddings, a build stopped after its first batch (an exception, and a subprocess killed with
SIGKILL) is resumed to exactly one row per image, and the CLI's outputs are read back.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("ray.data")
pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from fam_core.bulk.index_build import build_index, read_labels_csv  # noqa: E402
from fam_core.cli import main  # noqa: E402
from fam_core.data.flowers import make_flowers  # noqa: E402
from fam_core.pipeline import ServedModel  # noqa: E402
from fam_core.pipeline.explained_search import (  # noqa: E402
    embed,
    explained_search,
    load_uri_image,
)
from fam_core.render import save_png, to_png_bytes  # noqa: E402
from fam_core.search import GalleryIndex, open_index  # noqa: E402

MODEL = "default-embedding"
CLASSES = {"centre-yellow": 9, "petal-balls-red": 12, "stem-red": 6}
PER_CLASS = 4
IMAGES = len(CLASSES) * PER_CLASS
ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def model() -> ServedModel:
    return ServedModel.load(MODEL)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("search-build") / "gallery"
    for name, class_id in CLASSES.items():
        (folder / name).mkdir(parents=True)
        for number, image in enumerate(make_flowers([class_id], per_class=PER_CLASS).images):
            save_png((image * 255).round().byte().permute(1, 2, 0), folder / name / f"{number}.png")
    (folder / "stem-red" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not a PNG")
    return folder


@pytest.fixture(scope="module")
def built(ray_session, gallery, tmp_path_factory):
    index = str(tmp_path_factory.mktemp("search-index") / "gallery.db")
    report = build_index(MODEL, str(gallery), index, labels="folder", batch_size=4)
    return index, report


def _ids(gallery: Path) -> list[str]:
    return sorted(p.relative_to(gallery).as_posix() for p in gallery.rglob("[0-9].png"))


def test_every_image_is_indexed_once_with_the_pipeline_embedding(model, gallery, built):
    uri, report = built
    assert (report.images, report.written, report.indexed_before) == (IMAGES + 1, IMAGES, 0)
    ((failed_id, reason),) = report.failed
    assert failed_id == "stem-red/corrupt.png" and "cannot decode the image" in reason
    with open_index(uri) as index:
        assert index.count() == IMAGES
        assert index.labels() == dict.fromkeys(sorted(CLASSES), PER_CLASS)
        rows = index.get(_ids(gallery))
    assert [row.id for row in rows] == _ids(gallery)
    inputs = torch.stack([load_uri_image(model, str(gallery / row.id)) for row in rows])
    expected = embed(model, inputs)
    for row, embedding in zip(rows, expected, strict=True):
        assert row.uri == str((gallery / row.id).resolve())
        assert row.label == row.id.split("/")[0]
        torch.testing.assert_close(row.embedding, embedding, atol=TOLERANCE, rtol=0)


def test_a_second_build_adds_nothing(built, gallery):
    uri, _ = built
    again = build_index(MODEL, str(gallery), uri, labels="folder")
    assert (again.indexed_before, again.written, again.count) == (IMAGES, 0, IMAGES)
    assert [failed for failed, _ in again.failed] == ["stem-red/corrupt.png"]  # retried, listed


def test_a_build_stopped_after_one_batch_resumes_to_one_row_per_image(
    ray_session, gallery, tmp_path, monkeypatch
):
    uri = str(tmp_path / "stopped.db")
    upsert = GalleryIndex.upsert
    calls = []

    def fail_after_first(self, rows):
        calls.append(len(rows))
        if len(calls) > 1:
            raise RuntimeError("stopped")
        return upsert(self, rows)

    monkeypatch.setattr(GalleryIndex, "upsert", fail_after_first)
    with pytest.raises(RuntimeError, match="stopped"):
        build_index(MODEL, str(gallery), uri, batch_size=4)
    monkeypatch.setattr(GalleryIndex, "upsert", upsert)
    with open_index(uri) as index:
        kept = index.count()
    assert 0 < kept < IMAGES
    report = build_index(MODEL, str(gallery), uri, batch_size=4)
    assert report.indexed_before == kept
    assert report.written == IMAGES - kept
    with open_index(uri) as index:
        assert index.count() == IMAGES
        assert sorted(row.id for row in index.get(_ids(gallery))) == _ids(gallery)


@pytest.fixture
def scratch():
    """A short temporary folder for the killed build's TMPDIR (Ray's sockets live under it),
    removed with what still runs from it, however the test ends."""
    folder = Path(tempfile.mkdtemp(prefix="fsk-", dir=os.environ.get("RAY_TMPDIR", "/tmp")))
    yield folder
    _end_processes_using(folder)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_a_killed_build_resumes_to_one_row_per_image(ray_session, gallery, scratch, tmp_path):
    uri = str(tmp_path / "killed.db")
    barrier = tmp_path / "barrier"
    env = {
        **os.environ,
        "TMPDIR": str(scratch),
        "RAY_TMPDIR": str(scratch),
        "OMP_NUM_THREADS": "1",
        "FAM_BULK_PAUSE_AT": "index-batch-1",
        "FAM_BULK_PAUSE_FILE": str(barrier),
    }
    command = [
        *(sys.executable, "-m", "fam_core", "index", "build", "--model", MODEL),
        *("--images", str(gallery), "--index", uri, "--batch-size", "4", "--num-cpus", "1"),
    ]
    process = _paused_build(command, env, tmp_path / "build.log", barrier)
    os.killpg(process.pid, signal.SIGKILL)  # the build, its Ray and its Milvus Lite
    process.wait(timeout=60)
    _end_processes_using(scratch)
    # Milvus Lite serves the file from gRPC threads of the build; Ray's start forks, and a
    # fork while they poll made gRPC log "fork_posix.cc ... skipping fork() handlers"
    assert "fork_posix" not in (tmp_path / "build.log").read_text()
    with open_index(uri) as index:
        kept = index.count()
    assert 0 < kept < IMAGES
    report = build_index(MODEL, str(gallery), uri, batch_size=4)
    assert (report.indexed_before, report.written) == (kept, IMAGES - kept)
    with open_index(uri) as index:
        assert index.count() == IMAGES
        assert sorted(row.id for row in index.get(_ids(gallery))) == _ids(gallery)


def test_the_cli_build_prints_its_summary_line(ray_session, gallery, tmp_path, capsys):
    uri = str(tmp_path / "cli.db")
    argv = ["index", "build", "--model", MODEL, "--images", str(gallery), "--index", uri]
    assert main([*argv, "--batch-size", "4"]) == 0
    assert capsys.readouterr().out.startswith(
        f"{IMAGES} images indexed, 0 indexed before, 1 skipped"
    )


def _paused_build(
    command: list[str], env: dict[str, str], logs: Path, barrier: Path
) -> subprocess.Popen:
    """The build ``command`` started in a session of its own and paused at ``barrier`` (it
    wrote some index batches); the build fails the test if it ends first."""
    with open(logs, "wb") as output:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 300
    try:
        while not barrier.exists():
            assert process.poll() is None, logs.read_text()[-3000:]
            assert time.monotonic() < deadline, logs.read_text()[-3000:]
            time.sleep(0.05)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
        raise
    return process


def _end_processes_using(folder: Path) -> None:
    """SIGKILL what the killed build's Ray left outside its process group (none expected)."""
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(folder) in command and int(entry.name) != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)


def test_a_parquet_set_with_csv_labels(ray_session, model, gallery, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    flowers = make_flowers([9, 12], per_class=2)
    ids = ["p/0", "p/1", "q/0", "q/1"]
    encoded = [to_png_bytes((i * 255).round().byte().permute(1, 2, 0)) for i in flowers.images]
    parquet = tmp_path / "set.parquet"
    pq.write_table(pa.table({"id": ids, "image": encoded}), parquet)
    labels = tmp_path / "labels.csv"
    labels.write_text("id,label\np/0,yellow\np/1,yellow\nq/0,red\n")  # q/1 unlabelled
    uri = str(tmp_path / "parquet.db")
    report = build_index(MODEL, str(parquet), uri, labels=str(labels))
    assert (report.written, report.failed) == (4, [])
    with open_index(uri) as index:
        assert index.labels() == {"red": 1, "yellow": 2}
        rows = index.get(ids)
        assert [row.label for row in rows] == ["yellow", "yellow", "red", None]
        assert rows[2].uri == f"parquet://{parquet.resolve().as_posix()}#q/0"
        query = model.config.normalize(flowers.images[2:3])
        (found,) = explained_search(model, index, query, top_k=2, explain="both")
    assert found[0].neighbour.id == "q/0"
    assert found[0].reference_error is None and found[0].reference_map is not None


def test_a_labels_csv_must_name_its_columns(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("file,class\na,b\n")
    with pytest.raises(ValueError, match="header row with columns id,label"):
        read_labels_csv(bad)
    repeated = tmp_path / "repeated.csv"
    repeated.write_text("id,label\na,x\na,y\n")
    with pytest.raises(ValueError, match="line 3: id 'a' repeated"):
        read_labels_csv(repeated)


def test_fam_search_writes_results_maps_and_montages(model, gallery, built, tmp_path, capsys):
    uri, _ = built
    queries = [str(gallery / "centre-yellow" / "1.png"), str(gallery / "stem-red" / "2.png")]
    out = tmp_path / "out"
    args = ["search", "--model", MODEL, "--index", uri, *queries, "--top-k", "3"]
    assert main([*args, "--explain", "both", "--out", str(out)]) == 0
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 2
    explainer = model.explainer("fam")
    for number, line in enumerate(lines):
        record = json.loads(line)
        assert record["query"] == queries[number]
        results = record["results"]
        assert [r["id"] for r in results][0] == Path(queries[number]).relative_to(
            gallery
        ).as_posix()
        assert results[0]["score"] == pytest.approx(1.0, abs=1e-5)
        query = load_uri_image(model, queries[number])[None]
        for result in results:
            neighbour = open_index(uri)
            (row,) = neighbour.get([result["id"]])
            neighbour.close()
            query_map = np.load(out / result["query_map"])
            expected = explainer(query, target=row.embedding[None]).maps[0]
            np.testing.assert_allclose(query_map, expected.numpy(), atol=1e-4)
            reference_map = np.load(out / result["reference_map"])
            image = load_uri_image(model, result["uri"])[None]
            expected = explainer(image, target=embed(model, query)).maps[0]
            np.testing.assert_allclose(reference_map, expected.numpy(), atol=1e-4)
        assert (out / f"{number:04d}-{Path(queries[number]).stem}.png").stat().st_size > 0
    capsys.readouterr()
    assert main([*args[:-2], "--top-k", "2", "--explain", "none"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [len(p["results"]) for p in printed] == [2, 2]
    assert all(r["query_map"] is None for p in printed for r in p["results"])


def test_fam_index_info_and_one_line_errors(built, gallery, capsys):
    uri, _ = built
    assert main(["index", "info", uri]) == 0
    text = capsys.readouterr().out
    assert f"model: {MODEL}" in text and f"images: {IMAGES}" in text
    assert "labels: 3: centre-yellow (4), petal-balls-red (4), stem-red (4)" in text
    assert "index type: FLAT\n" in text
    query = str(gallery / "centre-yellow" / "0.png")
    build = ["index", "build", "--images", str(gallery), "--index"]
    for args, message in (
        (["search", "--model", "default-embedding-fine", "--index", uri, query], "built by model"),
        (["search", "--index", uri, "missing.png"], "missing.png: no such file"),
        (["search", "--index", uri, query, "--filter", "label ="], "filter 'label ='"),
        (
            ["search", "--index", uri, query, "--search-params", '{"ef": 64}'],
            "FLAT index: unknown search parameter 'ef' (allowed: none)",
        ),
        (["search", "--index", uri, query, "--search-params", "ef=64"], "must be a JSON object"),
        (["index", "info", "gallery.txt"], "expected a Milvus Lite file ending in .db"),
        (["index", "build", "--images", "/no/such", "--index", uri], "--images /no/such"),
        ([*build, uri, "--index-type", "IVF_PQ"], "index type must be one of ['FLAT', 'IVF_FLAT'"),
        ([*build, uri, "--index-type", "HNSW", "--index-params", '{"nlist": 8}'], "(allowed: M, "),
        ([*build, uri, "--index-type", "HNSW", "--index-params", "M=8"], "must be a JSON object"),
        ([*build, uri, "--index-params", '{"ef": 8}'], "index parameters need an index type"),
        ([*build, uri, "--index-type", "HNSW"], "is a FLAT index {}, not HNSW"),
    ):
        assert main(args) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("fam: error: ") and message in error and "\n" not in error


def test_an_hnsw_build_finds_what_the_flat_one_finds(built, gallery, tmp_path, capsys):
    flat_uri, _ = built
    uri = str(tmp_path / "hnsw.db")
    args = ["index", "build", "--images", str(gallery), "--index", uri, "--labels", "folder"]
    assert main([*args, "--index-type", "HNSW", "--index-params", '{"M": 8, "ef": 32}']) == 0
    assert main(["index", "info", uri]) == 0
    assert "index type: HNSW (M=8, efConstruction=200, ef=32)\n" in capsys.readouterr().out
    assert main(args) == 0  # resumed without --index-type: the index keeps its own
    with open_index(flat_uri) as flat, open_index(uri) as hnsw:
        assert hnsw.card.index_params == {"M": 8, "efConstruction": 200, "ef": 32}
        rows = flat.get(sorted(flat.engine.existing(_ids(gallery))))
        queries = torch.stack([row.embedding for row in rows])
        found = [[hit.id for hit in hits] for hits in hnsw.search(queries, 5)]
        assert found == [[hit.id for hit in hits] for hits in flat.search(queries, 5)]
