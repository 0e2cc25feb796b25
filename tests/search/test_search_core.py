"""Explained search on Milvus Lite: the gallery of the embedded benchmark, searched and
explained with the default embedding model, checked against the library's own embeddings,
similarities and explainers."""

from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from fam_core.data.flowers import make_flowers  # noqa: E402
from fam_core.maths.similarity import similarity  # noqa: E402
from fam_core.pipeline import ServedModel  # noqa: E402
from fam_core.pipeline.explained_search import (  # noqa: E402
    embed,
    explain_each_target,
    explained_search,
    load_uri_image,
)
from fam_core.render import save_png  # noqa: E402
from fam_core.search import (  # noqa: E402
    GalleryIndex,
    IndexCard,
    IndexRow,
    MilvusEngine,
    model_card,
    open_index,
    parse_index_uri,
)
from fam_core.search.milvus import CARD_TTL_S  # noqa: E402
from fam_core.tasks._similarity import pairwise_similarity  # noqa: E402

MODEL = "default-embedding"
CLASSES = [0, 4, 9, 13]  # four classes of the benchmark
PER_CLASS = 3
MAP_TOLERANCE = 1e-4  # batched and single passes round differently


@pytest.fixture(scope="module")
def model() -> ServedModel:
    return ServedModel.load(MODEL)


@pytest.fixture(scope="module")
def gallery(model, tmp_path_factory):
    """Benchmark flowers as PNG files, their model inputs (decoded back from the files as the
    pipeline decodes them) and an index of them."""
    folder = tmp_path_factory.mktemp("gallery")
    flowers = make_flowers(CLASSES, per_class=PER_CLASS)
    paths = []
    for number, (image, label) in enumerate(zip(flowers.images, flowers.labels, strict=True)):
        path = folder / flowers.class_names[int(label)] / f"{number:02d}.png"
        path.parent.mkdir(exist_ok=True)
        save_png((image * 255).round().byte().permute(1, 2, 0), path)
        paths.append(path)
    inputs = torch.stack([load_uri_image(model, str(path)) for path in paths])
    embeddings = embed(model, inputs)
    index = open_index(str(folder / "gallery.db"))
    index.create(model_card(model))
    rows = [
        IndexRow(p.relative_to(folder).as_posix(), str(p), p.parent.name, e)
        for p, e in zip(paths, embeddings, strict=True)
    ]
    index.upsert(rows)
    yield {"index": index, "inputs": inputs, "embeddings": embeddings, "rows": rows}
    index.close()


def test_a_gallery_image_finds_itself_first_with_score_one(model, gallery):
    found = explained_search(model, gallery["index"], gallery["inputs"], top_k=3, explain="none")
    assert [hits[0].neighbour.id for hits in found] == [row.id for row in gallery["rows"]]
    for hits in found:
        assert hits[0].neighbour.score == pytest.approx(1.0, abs=1e-5)
        assert all(h.query_map is None and h.reference_map is None for h in hits)


def test_scores_are_the_brute_force_cosine_of_the_library_embeddings(model, gallery):
    explainer = model.explainer("fam")
    queries = explainer.embed(gallery["inputs"])  # the library's own embedding path
    exact = pairwise_similarity(queries, gallery["embeddings"], "cosine")
    ids = [row.id for row in gallery["rows"]]
    found = gallery["index"].search(queries, top_k=len(ids))
    for q, hits in enumerate(found):
        assert len(hits) == len(ids)
        for hit in hits:
            assert hit.score == pytest.approx(float(exact[q, ids.index(hit.id)]), abs=1e-5)
        scores = [hit.score for hit in hits]
        assert scores == sorted(scores, reverse=True)
        assert hits[0].label == gallery["rows"][q].label


@pytest.mark.parametrize(
    ("method", "queries", "top_k"),
    [("fam", 2, 3), ("gradfam", 2, 3), ("scorefam", 1, 2), ("gradcam", 2, 3), ("xgradcam", 1, 3)],
)
def test_each_query_map_is_the_method_with_the_neighbour_as_target(
    model, gallery, method, queries, top_k
):
    # queries outside the gallery: a gallery image's own row has a zero cosine gradient
    flowers = make_flowers(CLASSES[1 : 1 + queries], 1, start_index=PER_CLASS)
    images = model.config.normalize(flowers.images)
    found = explained_search(model, gallery["index"], images, top_k=top_k, method=method)
    explainer = model.explainer(method)
    for q, hits in enumerate(found):
        assert len(hits) == top_k
        for hit in hits:
            alone = explainer(images[q : q + 1], target=hit.neighbour.embedding[None]).maps[0]
            torch.testing.assert_close(hit.query_map, alone, atol=MAP_TOLERANCE, rtol=0)
    first = found[0]
    assert top_k < 3 or not torch.allclose(first[0].query_map, first[-1].query_map, atol=1e-3), (
        "one map for every neighbour: the targets were not used"
    )


def test_the_query_maps_come_from_one_forward_pass(model, gallery):
    explainer = model.explainer("fam")
    calls = []
    handle = explainer.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        explained_search(model, gallery["index"], gallery["inputs"][:2], top_k=5)
    finally:
        handle.remove()
    assert len(calls) == 1  # one batched pass of both queries, none for their 10 neighbours


def test_both_runs_each_distinct_neighbour_image_once(model, gallery):
    explainer = model.explainer("fam")
    batches: list[int] = []
    handle = explainer.model.register_forward_hook(
        lambda _module, inputs, _output: batches.append(inputs[0].shape[0])
    )
    queries = gallery["inputs"][[0, 0]]  # the same image twice: the same 4 neighbours
    try:
        found = explained_search(model, gallery["index"], queries, top_k=4, explain="both")
    finally:
        handle.remove()
    assert [n.neighbour.id for n in found[0]] == [n.neighbour.id for n in found[1]]
    assert batches == [2, 4]  # the queries' pass, then the 4 distinct neighbours' (not 8)
    for first, second in zip(found[0], found[1], strict=True):
        torch.testing.assert_close(first.reference_map, second.reference_map)


def test_explain_each_target_equals_fam_eq_11_to_18_per_reference(model, gallery):
    explainer = model.explainer("fam")
    image, targets = gallery["inputs"][:1], gallery["embeddings"][[0, 5, 9]]
    maps = explain_each_target(explainer, image, targets, rows=torch.zeros(3, dtype=torch.long))
    for k in range(3):
        expected = explainer(image, target=targets[k : k + 1]).maps[0]
        torch.testing.assert_close(maps[k], expected, atol=MAP_TOLERANCE, rtol=0)


def test_both_explains_each_neighbour_for_the_query_and_reports_a_lost_image(
    model, gallery, tmp_path
):
    index, rows = gallery["index"], gallery["rows"]
    lost = IndexRow("lost.png", str(tmp_path / "lost.png"), rows[0].label, rows[0].embedding * 2)
    index.upsert([lost])
    try:
        query = gallery["inputs"][:1]
        found = explained_search(model, index, query, top_k=3, explain="both")[0]
    finally:
        index.engine.client.delete(index.engine.location.collection, ids=["lost.png"])
    assert {hit.neighbour.id for hit in found[:2]} == {rows[0].id, "lost.png"}
    explainer = model.explainer("fam")
    query_embedding = embed(model, query)
    for hit in found:
        assert hit.query_map is not None
        if hit.neighbour.id == "lost.png":
            assert hit.reference_map is None
            assert hit.reference_error == f"{lost.uri}: no such file"
            assert hit.neighbour.score == pytest.approx(1.0, abs=1e-5)
            continue
        assert hit.reference_error is None
        number = [row.id for row in rows].index(hit.neighbour.id)
        expected = explainer(gallery["inputs"][number : number + 1], target=query_embedding).maps[0]
        torch.testing.assert_close(hit.reference_map, expected, atol=MAP_TOLERANCE, rtol=0)


def test_a_filter_keeps_the_rows_it_names(model, gallery):
    label = gallery["rows"][4].label
    found = explained_search(
        model, gallery["index"], gallery["inputs"][:1], top_k=5, filter=f'label == "{label}"'
    )[0]
    assert len(found) == PER_CLASS
    assert {hit.neighbour.label for hit in found} == {label}
    with pytest.raises(ValueError, match=r"^filter 'label =! 3': "):
        gallery["index"].search(gallery["embeddings"][:1], 2, filter="label =! 3")


def test_an_index_of_another_model_is_refused_naming_both(gallery):
    other = ServedModel.load("default-embedding-fine")
    with pytest.raises(ValueError) as error:
        explained_search(other, gallery["index"], gallery["inputs"][:1])
    message = str(error.value)
    assert "\n" not in message
    assert "built by model default-embedding (64-dim" in message
    assert "searched with model default-embedding-fine" in message


def test_an_index_rebuilt_by_another_engine_is_checked_again_once_its_card_is_old(
    model, gallery, tmp_path
):
    """A server's engine and another one (the process that rebuilds the index; two engines
    of one Milvus Lite file here) share the collections: once its card is ``card_ttl``
    old, the server's engine reads it again, so the rebuilt index is checked again and its
    collections are loaded again."""
    path = str(tmp_path / "shared.db")
    writer = open_index(path)
    writer.create(model_card(model))
    writer.upsert(gallery["rows"])
    served = GalleryIndex(MilvusEngine(path, card_ttl=0.0), path)
    explained_search(model, served, gallery["inputs"][:1], top_k=2, explain="none")
    writer.drop()  # rebuilt by other weights
    writer.create(IndexCard(MODEL, 64, "cosine", "f" * 64))
    writer.upsert(gallery["rows"])
    with pytest.raises(ValueError, match="built by model default-embedding .*ffffffffffff"):
        explained_search(model, served, gallery["inputs"][:1], top_k=2, explain="none")
    writer.drop()  # and again by the model
    writer.create(model_card(model))
    writer.upsert(gallery["rows"][:3])
    found = explained_search(model, served, gallery["inputs"][:1], top_k=5, explain="none")
    assert len(found[0]) == 3 and found[0][0].neighbour.score == pytest.approx(1.0, abs=1e-4)
    assert MilvusEngine(path).card_ttl == CARD_TTL_S
    served.close()
    writer.close()


def test_searches_read_the_cards_once_and_a_rebuilt_index_is_checked_again(
    model, gallery, tmp_path, monkeypatch
):
    module = importlib.import_module("fam_core.pipeline.explained_search")
    built = open_index(str(tmp_path / "rebuilt.db"))
    built.create(model_card(model))
    built.upsert(gallery["rows"])
    built.close()
    index = open_index(str(tmp_path / "rebuilt.db"))  # a new engine: no card read yet
    card_reads: list[str] = []
    client_get = index.engine.client.get

    def reading(name, **options):
        if name.endswith("_card"):
            card_reads.append(name)
        return client_get(name, **options)

    model_cards = []

    def carding(served):
        model_cards.append(served)
        return model_card(served)

    monkeypatch.setattr(index.engine.client, "get", reading)
    monkeypatch.setattr(module, "model_card", carding)
    for _ in range(3):
        explained_search(model, index, gallery["inputs"][:1], top_k=2, explain="none")
    assert len(card_reads) == 1 and len(model_cards) == 1
    index.drop()  # rebuilt while serving, by other weights
    index.create(IndexCard(MODEL, 64, "cosine", "f" * 64))
    index.upsert(gallery["rows"])
    with pytest.raises(ValueError, match="built by model default-embedding .*ffffffffffff"):
        explained_search(model, index, gallery["inputs"][:1], top_k=2, explain="none")
    index.drop()  # and again by the model: searched again
    index.create(model_card(model))
    index.upsert(gallery["rows"])
    found = explained_search(model, index, gallery["inputs"][:1], top_k=2, explain="none")
    assert found[0][0].neighbour.score == pytest.approx(1.0, abs=1e-4)
    index.close()


def test_the_card_records_the_model(model, gallery):
    card = gallery["index"].card
    assert card == model_card(model)
    assert (card.model, card.dimension, card.similarity) == (MODEL, 64, "cosine")
    changed = IndexCard(MODEL, 64, "cosine", "f" * 64)  # same name, other weights
    with pytest.raises(ValueError, match="weights ffffffffffff"):
        gallery["index"].check_model(changed)
    assert gallery["index"].count() == len(gallery["rows"])
    assert gallery["index"].labels() == {row.label: PER_CLASS for row in gallery["rows"]}


@pytest.mark.parametrize("kind", ["dot", "euclidean"])
def test_the_metric_follows_the_similarity(kind, tmp_path):
    vectors = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    queries = torch.randn(2, 5, generator=torch.Generator().manual_seed(1))
    engine = MilvusEngine(str(tmp_path / "m.db"))
    engine.create(5, kind, IndexCard("m", 5, kind, "0" * 64))
    engine.upsert([IndexRow(str(i), "", None, v) for i, v in enumerate(vectors)])
    found = engine.search(queries, top_k=6)
    expected = similarity(queries, vectors.expand(2, 6, 5), kind)  # [2, 6]
    for q, hits in enumerate(found):
        for hit in hits:
            assert hit.score == pytest.approx(float(expected[q, int(hit.id)]), abs=1e-4)
        assert hits[0].id == str(int(expected[q].argmax()))
    engine.close()


def test_upsert_by_id_replaces_a_row(tmp_path):
    index = open_index(str(tmp_path / "u.db"))
    index.create(IndexCard("m", 2, "cosine", "0" * 64))
    index.upsert([IndexRow("a", "x", None, torch.tensor([1.0, 0.0]))])
    index.upsert([IndexRow("a", "y", "l", torch.tensor([0.0, 1.0]))] * 2)
    assert index.count() == 1
    (row,) = index.get(["a", "missing"])
    assert (row.uri, row.label, row.embedding.tolist()) == ("y", "l", [0.0, 1.0])
    index.close()


def test_index_uris():
    assert parse_index_uri("g.db") == ("g.db", "fam_index", False)
    assert parse_index_uri("https://milvus.example:19530/#gallery") == (
        "https://milvus.example:19530",
        "gallery",
        True,
    )
    for bad in ("g.sqlite", "ftp://host/g.db", "g.db#1x", "", "http://"):
        with pytest.raises(ValueError, match="index|URI"):
            parse_index_uri(bad)


def test_an_unreachable_server_is_one_line(tmp_path):
    index = open_index("http://127.0.0.1:9#gallery")
    index.engine.timeout = 1.0
    with pytest.raises(ValueError) as error:
        index.count()
    assert str(error.value).startswith("cannot reach Milvus at http://127.0.0.1:9: ")
    assert "\n" not in str(error.value)


def test_an_empty_file_is_no_gallery(tmp_path):
    with pytest.raises(ValueError, match="holds no gallery: build it with `fam index build`"):
        open_index(str(tmp_path / "none.db")).card  # noqa: B018
    missing = open_index(str(tmp_path / "none.db"))
    assert (missing.count(), missing.labels(), missing.get(["a"])) == (0, {}, [])
    assert not (tmp_path / "none.db").exists()  # reading never creates a file
    with pytest.raises(ValueError, match="no such folder"):
        open_index(str(tmp_path / "no" / "g.db")).create(IndexCard("m", 2, "cosine", "0" * 64))


def test_an_onnx_graph_searches_and_explains_as_the_torch_model(model, gallery, tmp_path):
    pytest.importorskip("onnxruntime")
    from fam_core.exporters import export_model
    from fam_core.models.store import load_model

    torch_model, config = load_model(MODEL)
    graph = ServedModel.load(export_model(torch_model, config, path=tmp_path / "fam.onnx"))
    index = open_index(str(tmp_path / "onnx.db"))
    index.create(model_card(graph))
    index.upsert(gallery["rows"])  # the torch embeddings: the graph computes the same
    queries = model.config.normalize(make_flowers(CLASSES[:2], 1, start_index=PER_CLASS).images)
    found = explained_search(graph, index, queries, top_k=3, explain="both")
    expected = explained_search(model, gallery["index"], queries, top_k=3, explain="both")
    index.close()
    for got, want in zip(found, expected, strict=True):
        assert [h.neighbour.id for h in got] == [h.neighbour.id for h in want]
        for hit, reference in zip(got, want, strict=True):
            assert hit.neighbour.score == pytest.approx(reference.neighbour.score, abs=1e-4)
            torch.testing.assert_close(hit.query_map, reference.query_map, atol=1e-3, rtol=0)
            torch.testing.assert_close(
                hit.reference_map, reference.reference_map, atol=1e-3, rtol=0
            )


def test_a_milvus_lite_client_pings_no_more_than_its_server_takes(tmp_path):
    # gRPC servers answer pings more often than every 5 minutes without data with GOAWAY
    from fam_core.search import MilvusEngine

    engine = MilvusEngine(str(tmp_path / "pings.db"))
    try:
        options = engine.client._get_connection()._grpc_options
    finally:
        engine.close()
    assert options["grpc.keepalive_time_ms"] >= 300_000
    assert options["grpc.keepalive_permit_without_calls"] is False


def test_close_frees_the_milvus_lite_file_for_this_process_and_another(tmp_path):
    """Milvus Lite's in-process server holds the file's lock until the last engine of the
    process that opened it closes: then a second index, here or in another process, opens it."""
    import subprocess
    import sys

    path = str(tmp_path / "g.db")
    first = open_index(path)
    first.create(IndexCard("m", 2, "cosine", "0" * 64))
    first.upsert([IndexRow("a", "a.png", "x", torch.tensor([1.0, 0.0]))])
    second = open_index(path)  # the same file twice in one process: one server
    assert second.count() == 1
    first.close()
    assert second.count() == 1  # still open: the server is kept for it
    second.close()
    child = f"from fam_core.search import open_index; i = open_index({path!r}); print(i.count()); i.close()"
    done = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "1"
    with open_index(path) as again:  # reopened after close, in this process
        again.upsert([IndexRow("b", "b.png", None, torch.tensor([0.0, 1.0]))])
        assert again.count() == 2
    with open_index(path) as third:
        assert [hit.id for hit in third.search(torch.tensor([0.0, 1.0]), 1)[0]] == ["b"]


def _recall(found, truth: torch.Tensor) -> float:
    """Mean fraction of the exact top-k that each query's hits hold."""
    return (
        sum(
            len({int(hit.id) for hit in hits} & set(row.tolist()))
            for hits, row in zip(found, truth, strict=True)
        )
        / truth.numel()
    )


@pytest.mark.parametrize(
    ("index_type", "params"),
    [("IVF_FLAT", {"nlist": 64}), ("HNSW", {"M": 8, "efConstruction": 64})],
)
def test_an_approximate_index_finds_the_exact_neighbours(index_type, params, tmp_path):
    """Built, closed (Milvus Lite then writes and indexes the rows) and reopened, as a
    server opens a gallery: recall@10 against exact search with the default search
    parameters, and the card records the index."""
    generator = torch.Generator().manual_seed(0)
    vectors = torch.nn.functional.normalize(torch.randn(2000, 16, generator=generator), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(50, 16, generator=generator), dim=1)
    truth = (queries @ vectors.T).topk(10, dim=1).indices
    path = str(tmp_path / "g.db")
    with open_index(path) as index:
        index.create(IndexCard("m", 16, "cosine", "0" * 64, index_type, params))
        index.upsert([IndexRow(str(i), "", None, v) for i, v in enumerate(vectors)])
    with open_index(path) as index:
        card = index.card
        assert (card.index_type, card.index_params) == (
            index_type,
            {**params, **({"nprobe": 32} if index_type == "IVF_FLAT" else {"ef": 64})},
        )
        described = index.engine.client.describe_index("fam_index", "vector")
        assert (described["index_type"], described["params"]) == (index_type, params)
        assert _recall(index.search(queries, 10), truth) >= 0.95
        if index_type == "IVF_FLAT":  # the search parameter reaches the index: one cell of 64
            assert _recall(index.search(queries, 10, search_params={"nprobe": 1}), truth) < 0.6
        else:
            wide = index.search(queries, 10, search_params={"ef": 500})
            assert _recall(wide, truth) >= 0.95


def test_a_flat_index_is_the_default_and_an_old_card_reads_as_flat():
    card = IndexCard("m", 2, "cosine", "0" * 64)
    assert (card.index_type, card.index_params) == ("FLAT", {})
    old = '{"dimension": 2, "model": "m", "model_hash": "ab", "similarity": "cosine"}'
    assert IndexCard.from_json(old).index_type == "FLAT"
    hnsw = IndexCard("m", 2, "cosine", "0" * 64, "HNSW", {"ef": 100})
    assert IndexCard.from_json(hnsw.to_json()) == hnsw
    assert hnsw.index_params == {"M": 16, "efConstruction": 200, "ef": 100}


@pytest.mark.parametrize(
    ("index_type", "params", "message"),
    [
        ("IVF_PQ", {}, "index type must be one of ['FLAT', 'IVF_FLAT', 'HNSW'], got 'IVF_PQ'"),
        ("hnsw", {}, "index type must be one of"),
        ("FLAT", {"nlist": 8}, "FLAT index: unknown parameter 'nlist' (allowed: none)"),
        ("HNSW", {"nlist": 8}, "unknown parameter 'nlist' (allowed: M, efConstruction, ef)"),
        ("IVF_FLAT", {"nlist": 0}, "nlist must be an int in [1, 65536], got 0"),
        ("HNSW", {"M": 16.5}, "M must be an int in [2, 2048], got 16.5"),
        ("HNSW", {"ef": True}, "ef must be an int"),
    ],
)
def test_a_bad_index_type_or_parameter_is_one_line(index_type, params, message):
    with pytest.raises(ValueError) as error:
        IndexCard("m", 2, "cosine", "0" * 64, index_type, params)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_search_parameter_of_another_index_type_is_refused(gallery):
    with pytest.raises(ValueError, match=r"FLAT index: unknown search parameter 'ef'"):
        gallery["index"].search(gallery["rows"][0].embedding, 1, search_params={"ef": 10})


def test_search_params_given_at_open_replace_the_cards(tmp_path):
    path = str(tmp_path / "g.db")
    with open_index(path) as index:
        index.create(IndexCard("m", 2, "cosine", "0" * 64, "HNSW"))
        index.upsert([IndexRow("a", "a.png", None, torch.tensor([1.0, 0.0]))])
    with open_index(path, search_params={"ef": 128}) as index:
        index.check_search_params()
        assert index.search(torch.tensor([1.0, 0.0]), 1)[0][0].id == "a"
    with (
        open_index(path, search_params={"nprobe": 8}) as index,
        pytest.raises(
            ValueError, match=r"HNSW index: unknown search parameter 'nprobe' \(allowed: ef\)"
        ),
    ):
        index.check_search_params()
