"""fam bulk: Ray Data actors give the in-process pipeline's rows; error rows; restarts; summaries.

One small local Ray session is shared by the module (2 CPUs, no dashboard, a small object
store) and one bulk job of a few hundred generated benchmark images serves several tests.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("ray.data")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from fam_core.bulk import BulkOptions, decode_heatmap, read_rows, run_bulk  # noqa: E402
from fam_core.bulk.plan import Item, Plan, list_images  # noqa: E402
from fam_core.bulk.rows import error_row  # noqa: E402
from fam_core.bulk.sample import write_flower_pngs  # noqa: E402
from fam_core.bulk.shards import write_shard  # noqa: E402
from fam_core.bulk.summary import (  # noqa: E402
    domain_gap,
    mean_heatmaps,
    summarise,
    write_domain_gap,
    write_montages,
)
from fam_core.bulk.worker import BulkWorker, ExplainSettings, WorkerSpec  # noqa: E402
from fam_core.cli import main  # noqa: E402
from fam_core.pipeline import (  # noqa: E402
    EncodedImage,
    ExplainRequest,
    Limits,
    ModelRegistry,
    Pipeline,
    PipelineError,
    ServedModel,
    heatmap_bytes,
)
from fam_core.pipeline.limits import IMAGE_FORMATS  # noqa: E402
from fam_core.render import overlay  # noqa: E402

MODEL = "default-classifier"
IMAGES = 240
SHARD = 64
HEATMAP_TOLERANCE = 2e-3  # float16 heatmaps; batched and single passes differ in rounding


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bulk") / "images"
    write_flower_pngs(folder, IMAGES)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a PNG")
    from PIL import Image

    Image.new("RGB", (400, 4)).save(folder / "thin.png")  # aspect ratio 100: over the limit
    return folder


@pytest.fixture(scope="module")
def bulk_job(ray_session, image_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bulk-out") / "out"
    options = BulkOptions(
        models=(MODEL,),
        images=str(image_dir),
        out=str(out),
        actors=2,
        batch_size=16,
        shard_size=SHARD,
    )
    return options, run_bulk(options, progress=lambda message: None)


def _in_process_rows(image_dir: Path) -> dict[str, object]:
    """What the pipeline returns explaining the images one at a time, as ``fam explain`` does
    (bulk jobs read local files: every image format is accepted)."""
    limits = Limits(formats=IMAGE_FORMATS)
    pipeline = Pipeline(ModelRegistry([ServedModel.load(MODEL)]), limits=limits, batching=None)
    answers: dict[str, object] = {}
    for path in sorted(image_dir.iterdir()):
        request = ExplainRequest(model=MODEL, images=(EncodedImage(path.read_bytes()),))
        try:
            answers[path.name] = pipeline.explain(request).results[0]
        except PipelineError as error:
            answers[path.name] = error
    return answers


def test_two_actors_give_the_rows_of_the_in_process_pipeline(bulk_job, image_dir):
    options, report = bulk_job
    rows = read_rows(options.out)
    expected = _in_process_rows(image_dir)
    assert report.rows == len(rows) == IMAGES + 2
    assert sorted(r["id"] for r in rows) == sorted(expected)
    order = sorted(expected)
    for row in rows:
        assert row["shard"] == order.index(row["id"]) // SHARD  # fixed, input-order shards
        answer = expected[row["id"]]
        if isinstance(answer, PipelineError):
            assert row["error"].endswith(str(answer).splitlines()[0])
            continue
        assert row["error"] == ""
        assert (row["label"], row["class_index"]) == (
            answer.prediction.label,
            answer.prediction.index,
        )
        assert row["score"] == pytest.approx(answer.prediction.score, abs=1e-4)
        assert row["scores"] == pytest.approx(list(answer.scores), abs=1e-4)
        assert row["explained_score"] == pytest.approx(answer.explained_score, abs=1e-3)
        assert row["method"] == answer.heatmap.method == "cam"
        assert tuple(row["heatmap_shape"]) == answer.heatmap.shape == (84, 84)
        single = decode_heatmap({"heatmap": answer.heatmap.data, "heatmap_shape": [84, 84]})
        torch.testing.assert_close(decode_heatmap(row), single, atol=HEATMAP_TOLERANCE, rtol=0)


def test_bad_files_become_error_rows_and_the_job_goes_on(bulk_job):
    options, report = bulk_job
    rows = {r["id"]: r for r in read_rows(options.out)}
    assert "cannot decode" in rows["corrupt.png"]["error"]
    assert "aspect ratio" in rows["thin.png"]["error"]
    for bad in ("corrupt.png", "thin.png"):
        assert rows[bad]["heatmap"] is None and rows[bad]["label"] is None
    assert report.errors == 2
    assert sum(1 for r in rows.values() if not r["error"]) == IMAGES


def test_restart_recomputes_only_the_missing_shard(bulk_job, tmp_path):
    options, first = bulk_job
    out = tmp_path / "out"
    shutil.copytree(options.out, out)
    shards = sorted((out / "shards").glob("shard-*.parquet"))
    assert len(shards) == first.shards == -(-(IMAGES + 2) // SHARD)
    removed = shards[1]
    before = pq.read_table(removed).to_pylist()
    removed.unlink()
    stamps = {s: s.stat().st_mtime_ns for s in shards if s != removed}
    again = run_bulk(
        dataclasses.replace(options, out=str(out), actors=1, batch_size=7),
        progress=lambda message: None,
    )
    assert again.written == [1] and again.skipped == [0, 2, 3]
    assert {s: s.stat().st_mtime_ns for s in shards if s != removed} == stamps
    after = pq.read_table(removed).to_pylist()
    assert [r["id"] for r in after] == [r["id"] for r in before]  # same rows, batch size 7
    for old, new in zip(before, after, strict=True):
        assert (old["label"], old["error"]) == (new["label"], new["error"])
        if old["heatmap"] is not None:
            torch.testing.assert_close(
                decode_heatmap(new), decode_heatmap(old), atol=HEATMAP_TOLERANCE, rtol=0
            )
    assert not list(out.rglob(".*.tmp")) and not (out / "checkpoints").exists()


def test_the_shards_folder_reads_with_pandas_pyarrow_ray_and_duckdb(
    bulk_job, ray_session, tmp_path
):
    import duckdb
    import numpy as np
    import pandas as pd
    import pyarrow.dataset as ds

    options, report = bulk_job
    out = tmp_path / "out"
    shutil.copytree(options.out, out)
    folder = out / "shards"
    # what a job killed while writing leaves: a hidden temporary, part files elsewhere
    (folder / ".shard-00001-of-00004.parquet.4194304.tmp").write_bytes(b"PAR1 half written")
    expected = sorted((r["id"], r["model"]) for r in read_rows(out, columns=["id", "model"]))
    assert len(expected) == report.rows == IMAGES + 2
    frame = pd.read_parquet(folder)
    assert sorted(zip(frame["id"], frame["model"], strict=True)) == expected
    table = ds.dataset(folder, format="parquet").to_table(columns=["id", "model"])
    assert sorted(zip(*table.to_pydict().values(), strict=True)) == expected
    taken = ray_session.data.read_parquet(str(folder)).select_columns(["id", "model"]).take_all()
    assert sorted((r["id"], r["model"]) for r in taken) == expected
    query = f"SELECT id, model FROM read_parquet('{folder}/*.parquet') ORDER BY id, model"
    assert duckdb.sql(query).fetchall() == expected
    row = frame[frame["error"] == ""].iloc[0]
    heatmap = np.frombuffer(row["heatmap"], "<f2").reshape(row["heatmap_shape"])
    expected_map = decode_heatmap({"heatmap": row["heatmap"], "heatmap_shape": [84, 84]})
    np.testing.assert_array_equal(heatmap.astype(np.float32), expected_map.numpy())


def test_an_output_of_the_earlier_layout_is_moved_not_recomputed(bulk_job, tmp_path):
    options, first = bulk_job
    out = tmp_path / "out"
    shutil.copytree(options.out, out)
    names = sorted(p.name for p in (out / "shards").iterdir())
    for shard in (out / "shards").iterdir():  # shards beside job.json, as jobs wrote them before
        shard.rename(out / shard.name)
    (out / "shards").rmdir()
    assert sum(count for _, count in mean_heatmaps(out).values()) == IMAGES
    again = run_bulk(dataclasses.replace(options, out=str(out)), progress=lambda message: None)
    assert again.written == [] and again.skipped == list(range(first.shards))
    assert again.images_skipped == again.images == IMAGES + 2
    assert sorted(p.name for p in (out / "shards").iterdir()) == names
    assert not list(out.glob("shard-*.parquet"))


def test_restart_with_other_settings_is_refused(bulk_job, tmp_path, capsys):
    options, _ = bulk_job
    out = tmp_path / "out"
    shutil.copytree(options.out, out)
    code = main(
        [
            "bulk",
            "--model",
            MODEL,
            "--images",
            options.images,
            "--out",
            str(out),
            "--shard-size",
            "8",
        ]
    )
    assert code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "holds another job (its plan, shard_size differs)" in error[0]


def test_parquet_image_set_on_ray(ray_session, image_dir, tmp_path):
    files = sorted(image_dir.glob("flower-0000*.png"))
    table = pa.table(
        {"id": [f"img-{i}" for i in range(len(files))], "image": [f.read_bytes() for f in files]}
    )
    pq.write_table(table, tmp_path / "set.parquet")
    out = tmp_path / "out"
    report = run_bulk(
        BulkOptions(
            models=(MODEL,), images=str(tmp_path / "set.parquet"), out=str(out), shard_size=4
        ),
        progress=lambda message: None,
    )
    rows = read_rows(out)
    assert report.written == [0, 1, 2] and [r["id"] for r in rows] == sorted(
        table["id"].to_pylist()
    )
    expected = _in_process_rows(image_dir)
    for row, file in zip(rows, files, strict=True):  # img-0..img-9 sort as the files do
        assert row["label"] == expected[file.name].prediction.label


# -- the worker without Ray: metrics, checkpoints side by side


def _worker_rows(spec: WorkerSpec, files: list[Path]) -> list[dict]:
    worker = BulkWorker(spec)
    return worker.rows([str(f) for f in files], tuple(EncodedImage(f.read_bytes()) for f in files))


def test_eval_metrics_follow_their_definitions(image_dir, tmp_path):
    files = sorted(image_dir.glob("flower-*.png"))[:6]
    settings = ExplainSettings(evaluate=True, eval_steps=4)
    spec = WorkerSpec(models=(MODEL,), settings=settings, shards={str(f): 0 for f in files})
    rows = _worker_rows(spec, files)
    served = ServedModel.load(MODEL)
    pipeline = Pipeline(ModelRegistry([served]), batching=None)
    config = served.config
    for row, file in zip(rows, files, strict=True):
        pixels = pipeline.pixels(MODEL, (EncodedImage(file.read_bytes()),))
        maps = decode_heatmap(row)[None]
        mean = torch.tensor(config.mean).view(1, 3, 1, 1)
        masked = mean + maps[:, None] * (pixels - mean)  # L o X on the normalised input
        with torch.no_grad():
            p = torch.softmax(served.model(config.normalize(masked)), 1)[0, row["class_index"]]
        s = row["score"]  # eq. 21's s_i is the explained class's probability
        assert row["average_drop"] == pytest.approx(max(0.0, s - float(p)) / s * 100, abs=0.05)
        assert row["increase_confidence"] == (100.0 if float(p) > s else 0.0)
        assert 0.0 <= row["deletion_auc"] <= row["insertion_auc"] + 1.0
    write_shard(tmp_path, "shard-00000-of-00001.parquet", rows)
    summary = summarise(tmp_path)[MODEL]
    assert summary["images"] == 6 and summary["errors"] == 0
    assert summary["metrics"]["average_drop"] == pytest.approx(
        sum(r["average_drop"] for r in rows) / 6, rel=1e-5
    )


def test_checkpoints_side_by_side_with_a_montage_per_image(image_dir, tmp_path):
    files = sorted(image_dir.glob("flower-*.png"))[:3] + [image_dir / "corrupt.png"]
    models = (MODEL, "default-embedding")
    spec = WorkerSpec(
        models=models,
        settings=ExplainSettings(overlay=True),
        shards={str(f): 0 for f in files},
        ids={str(f): f.name for f in files},
    )
    rows = _worker_rows(spec, files)
    assert [(r["id"], r["model"]) for r in rows[:2]] == [(files[0].name, m) for m in models]
    write_shard(tmp_path, "shard-00000-of-00001.parquet", rows)
    folder = write_montages(tmp_path, list(models))
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{f.name}.png" for f in files[:3])
    import numpy as np
    from PIL import Image

    montage = np.asarray(Image.open(folder / f"{files[0].name}.png"))
    assert montage.shape == (84, 168, 3)
    served = ServedModel.load("default-embedding")
    pixels = Pipeline(ModelRegistry([served]), batching=None).pixels(
        "default-embedding", (EncodedImage(files[0].read_bytes()),)
    )
    right = overlay(pixels[0], decode_heatmap(rows[1])).numpy()
    difference = np.abs(montage[:, 84:].astype(int) - right.astype(int))
    # the row's heatmap is float16: a pixel at a colour-table step may fall one entry over
    assert difference.max() <= 8 and difference.mean() < 0.05


def test_mean_heatmaps_and_domain_gap(tmp_path):
    def shard(folder: Path, values: list[float]) -> Path:
        rows = []
        for index, value in enumerate(values):
            row = error_row(f"{index}.png", "m", 0, "")
            row.update(heatmap=heatmap_bytes(torch.full((2, 3), value)), heatmap_shape=[2, 3])
            rows.append(row)
        rows.append(error_row("bad.png", "m", 0, "InvalidArgument: broken"))
        folder.mkdir()
        return write_shard(folder, "shard-00000-of-00001.parquet", rows).parent

    first, second = shard(tmp_path / "a", [0.25, 0.75, 1.0]), shard(tmp_path / "b", [0.5])
    (mean, count), *_ = mean_heatmaps(first).values()
    assert count == 3
    torch.testing.assert_close(mean, torch.full((2, 3), 2.0 / 3), atol=1e-3, rtol=0)
    gap = domain_gap(mean_heatmaps(first), mean_heatmaps(second))["m"]
    assert gap["mean_abs_difference"] == pytest.approx(2.0 / 3 - 0.5, abs=1e-3)
    numbers = write_domain_gap(first, second, tmp_path / "gap")
    assert numbers["images"] == [3, 1]
    assert json.loads((tmp_path / "gap" / "gap.json").read_text())["models"]["m"]["images"] == [
        3,
        1,
    ]
    assert (tmp_path / "gap" / "gap-m.png").is_file()


# -- the plan and the command line


def test_shards_are_fixed_by_sorted_ids():
    items = [Item(f"{name}.png", f"/x/{name}.png") for name in "edcba"]
    plan = Plan.of(items, shard_size=2)
    assert [[i.id for i in s] for s in plan.shards] == [
        ["a.png", "b.png"],
        ["c.png", "d.png"],
        ["e.png"],
    ]
    assert plan.fingerprint() == Plan.of(list(reversed(items)), 2).fingerprint()
    assert plan.fingerprint() != Plan.of(items, 3).fingerprint()
    with pytest.raises(ValueError, match="unique"):
        Plan.of([Item("a"), Item("a")], 2)


def test_list_images_of_a_folder_and_a_glob(image_dir):
    items, parquet = list_images(str(image_dir))
    assert len(items) == IMAGES + 2 and parquet == ()
    globbed, _ = list_images(str(image_dir / "flower-0001*.png"))
    assert [i.id for i in sorted(globbed, key=lambda i: i.id)][:2] == [
        "flower-00010.png",
        "flower-00011.png",
    ]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--images", "/no/such/folder"], "no such folder or file"),
        (["--images", "{images}", "--actors", "0"], "--actors must be an int >= 1"),
        (["--images", "{images}", "--model", "no-such-model"], "no-such-model"),
        (["--images", "{images}", "--method", "no-such-method"], "no-such-method"),
        (["--images", "{images}", "--montage"], "--montage needs --overlay"),
        (["--images", "{images}", "--eval", "--resolution", "feature"], "--eval needs"),
        (["--images", "{images}", "--checkpoint-seconds", "0"], "--checkpoint-seconds must be"),
    ],
)
def test_bad_command_lines_exit_2_with_one_line(arguments, message, image_dir, tmp_path, capsys):
    arguments = [a.format(images=image_dir) for a in arguments]
    assert main(["bulk", *arguments, "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0], error
