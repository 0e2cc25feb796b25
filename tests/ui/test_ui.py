"""The browser viewer (``fam ui``) in a real browser: Playwright driving Debian's chromium.

The page shows what the pipeline answers; the scores checked here are computed independently
from the model's own outputs. A browser that cannot start fails these tests (it never skips
them): ``scripts/bootstrap.sh test`` installs chromium.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from search_helpers import KNN_MODEL, SEARCH_MODEL, build_index, make_gallery, write_model
from serving_helpers import default_sigint_in_children, free_port, running_server

from fam_core.data.flowers import CLASS_NAMES, make_flowers
from fam_core.models.store import load_model
from fam_core.pipeline import Limits, ModelRegistry, ServedModel
from fam_core.render import to_png_bytes
from fam_core.server.app import ServerConfig
from fam_core.tasks.knn import knn_predict
from fam_core.ui.app import ViewerServer
from fam_core.ui.backends import LocalBackend, RemoteBackend
from fam_core.ui.views import explain_view, load_gallery

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
GALLERY_CLASSES = (3, 9, 12)  # three benchmark classes, two images each
TOP_K = 4
KNN_K = 4
SCORE_DIGITS = 4  # the page shows scores with 4 decimals


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        except Exception as error:  # the browser test must fail, not skip, without a browser
            pytest.fail(f"chromium ({CHROMIUM}) does not start: {error}")
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    page = browser.new_page()
    yield page
    page.close()


def flower_png(class_id: int, index: int = 0) -> bytes:
    flower = make_flowers([class_id], per_class=index + 1).images[index]
    return to_png_bytes((flower * 255).round().byte().permute(1, 2, 0))


@pytest.fixture(scope="module")
def gallery_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gallery")
    for class_id in GALLERY_CLASSES:
        folder = root / CLASS_NAMES[class_id]
        folder.mkdir()
        for index in range(2):
            (folder / f"{index}.png").write_bytes(flower_png(class_id, index))
    return root


def model_outputs(name: str, pngs: list[bytes]) -> torch.Tensor:
    """The model's outputs on 84 x 84 PNGs, decoded with PIL (no pipeline code)."""
    model, config = load_model(name)
    arrays = [np.array(Image.open(io.BytesIO(png)).convert("RGB")) for png in pngs]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        return model(config.normalize(pixels))


def drop_image(page, viewer: ViewerServer, path: Path, cards: int) -> list[dict]:
    """Open the page, drop ``path`` on the file input, wait for ``cards`` cards; read them."""
    page.goto(viewer.url)
    page.wait_for_selector("body[data-ready=true]")
    page.set_input_files("#file", str(path))
    page.wait_for_function(f"document.querySelectorAll('.card').length === {cards}")
    page.wait_for_function(
        "[...document.images].every((image) => image.complete && image.naturalWidth > 0)"
    )
    return page.eval_on_selector_all(
        ".card",
        """cards => cards.map(card => ({
            label: card.querySelector('.label').textContent,
            score: parseFloat(card.querySelector('.score').textContent),
            neighbours: card.querySelectorAll('img.neighbour').length,
            note: card.querySelector('.note')?.textContent ?? null,
            heat: card.querySelectorAll('img.heat').length,
            sizes: [...card.querySelectorAll('img')].map(i => [i.naturalWidth, i.naturalHeight]),
        }))""",
    )


def test_classifier_page_shows_the_top_five_classes_each_with_a_map(page, tmp_path) -> None:
    png = flower_png(9)
    query = tmp_path / "query.png"
    query.write_bytes(png)
    viewer = ViewerServer(LocalBackend.load("default-classifier"), port=0)
    viewer.start()
    try:
        cards = drop_image(page, viewer, query, 5)
    finally:
        viewer.stop()
    probabilities = F.softmax(model_outputs("default-classifier", [png]), dim=1)[0]
    values, indices = probabilities.topk(5)
    _, config = load_model("default-classifier")
    assert [c["label"] for c in cards] == [config.class_names[i] for i in indices.tolist()]
    for card, value in zip(cards, values.tolist(), strict=True):
        assert card["score"] == pytest.approx(value, abs=10**-SCORE_DIGITS)
        assert card["heat"] == 1  # one map per class
        assert card["sizes"] == [[84, 84], [84, 84]]


def test_gallery_page_shows_k_neighbours_with_scores_and_both_maps(page, gallery_dir) -> None:
    query = gallery_dir / CLASS_NAMES[9] / "0.png"
    gallery = load_gallery(gallery_dir)
    viewer = ViewerServer(
        LocalBackend.load("default-embedding"), port=0, top_k=TOP_K, gallery=gallery
    )
    viewer.start()
    try:
        cards = drop_image(page, viewer, query, TOP_K)
    finally:
        viewer.stop()
    embeddings = model_outputs("default-embedding", [g.data for g in gallery])
    cosine = F.cosine_similarity(embeddings[[gallery.index(_entry(gallery, query))]], embeddings)
    values, indices = cosine.topk(TOP_K)
    assert [c["label"] for c in cards] == [gallery[i].label for i in indices.tolist()]
    assert cards[0]["score"] == pytest.approx(1.0, abs=10**-SCORE_DIGITS)  # itself first
    for card, value in zip(cards, values.tolist(), strict=True):
        assert card["score"] == pytest.approx(value, abs=10**-SCORE_DIGITS)
        assert card["neighbours"] == 1
        assert card["heat"] == 2  # the query's map and the neighbour's


def _entry(gallery, path: Path):
    (entry,) = [g for g in gallery if path.as_posix().endswith(g.id)]
    return entry


def test_opacity_slider_sets_the_heatmap_layers_opacity(page, tmp_path) -> None:
    query = tmp_path / "query.png"
    query.write_bytes(flower_png(3))
    viewer = ViewerServer(LocalBackend.load("default-classifier"), port=0)
    viewer.start()
    try:
        drop_image(page, viewer, query, 5)
        page.fill("#opacity", "20")
        opacities = page.eval_on_selector_all(
            "img.heat", "layers => layers.map(l => getComputedStyle(l).opacity)"
        )
    finally:
        viewer.stop()
    assert opacities == ["0.2"] * 5


def test_bad_uploads_get_a_4xx_line_and_the_server_serves_on(page, tmp_path) -> None:
    limits = Limits(max_request_bytes=20_000)
    viewer = ViewerServer(LocalBackend.load("default-classifier", limits=limits), port=0)
    viewer.start()
    try:
        not_an_image = _post(viewer, b"plain text, not an image")
        too_large = _post(viewer, bytes(20_001))
        unknown_method = _post(viewer, flower_png(3), "?method=no-such-method")
        ok = _post(viewer, flower_png(3))
        text_file = tmp_path / "notes.png"
        text_file.write_bytes(b"not an image either")
        page.goto(viewer.url)
        page.wait_for_selector("body[data-ready=true]")
        page.set_input_files("#file", str(text_file))
        page.wait_for_selector("#status.error")
        shown = page.inner_text("#status")
    finally:
        viewer.stop()
    assert not_an_image[0] in (400, 415) and "\n" not in not_an_image[1]["error"]
    assert too_large == (413, {"error": "the image has 20001 bytes, over the limit of 20000 bytes"})
    assert unknown_method[0] == 400 and "no-such-method" in unknown_method[1]["error"]
    assert ok[0] == 200 and len(ok[1]["items"]) == 5
    assert shown.startswith(("400: ", "415: "))


def _post(viewer: ViewerServer, body: bytes, query: str = "") -> tuple[int, dict]:
    request = urllib.request.Request(viewer.url + "api/explain" + query, data=body)
    try:
        with urllib.request.urlopen(request) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def view_through_a_server(registry: ModelRegistry, model: str, png: bytes) -> dict:
    """The Grad-FAM view of ``png`` through a ``RemoteBackend`` on a server of ``registry``."""
    with running_server(registry, ServerConfig(port=0), grace=1.0) as server:
        remote = RemoteBackend(f"127.0.0.1:{server.port}", model)
        seen = explain_view(remote, png, method="gradfam")
        remote.close()
    return seen


def test_a_running_server_gives_the_same_view_as_the_model_in_process() -> None:
    png = flower_png(12)
    local = LocalBackend.load("default-classifier")
    seen_remotely = view_through_a_server(
        ModelRegistry.from_names(["default-classifier"]), "default-classifier", png
    )
    seen_locally = explain_view(local, png, method="gradfam")
    local.close()
    assert seen_remotely == seen_locally


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """A model folder whose config names an index of a small benchmark gallery (one more row,
    ``gone-0.png``, has gallery image 0's embedding and no image file)."""
    folder = tmp_path_factory.mktemp("ui-search")
    gallery = make_gallery(folder)
    build_index(
        gallery, write_model(folder / "build", SEARCH_MODEL), str(folder / "g.db"), extra_rows=1
    )
    return gallery, write_model(folder / "models", SEARCH_MODEL, index="../../g.db", top_k=TOP_K)


def test_index_page_shows_k_neighbours_with_scores_and_both_maps(page, indexed) -> None:
    gallery, model_folder = indexed
    query = gallery.queries[1]
    viewer = ViewerServer(LocalBackend(ServedModel.load(model_folder)), port=0)
    viewer.start()
    try:
        cards = drop_image(page, viewer, query, TOP_K)
    finally:
        viewer.stop()
    pngs = [gallery.path(i).read_bytes() for i in gallery.ids]
    outputs = model_outputs("default-embedding", [query.read_bytes(), *pngs])
    cosine = F.cosine_similarity(outputs[:1], outputs[1:])
    values, indices = cosine.topk(TOP_K)
    assert [c["label"] for c in cards] == [gallery.labels[i] for i in indices.tolist()]
    for card, value in zip(cards, values.tolist(), strict=True):
        assert card["score"] == pytest.approx(value, abs=10**-SCORE_DIGITS)
        assert (card["neighbours"], card["heat"], card["note"]) == (1, 2, None)


def test_an_indexed_image_that_is_gone_keeps_its_score_and_says_why(page, indexed) -> None:
    gallery, model_folder = indexed
    viewer = ViewerServer(LocalBackend(ServedModel.load(model_folder)), port=0, top_k=2)
    viewer.start()
    try:
        cards = drop_image(page, viewer, gallery.path(gallery.ids[0]), 2)
    finally:
        viewer.stop()
    # the image itself and the row with its embedding whose file is gone: both score 1
    assert [c["score"] for c in cards] == pytest.approx([1.0, 1.0], abs=10**-SCORE_DIGITS)
    gone = [c for c in cards if c["note"] is not None]
    assert len(gone) == 1 and "gone-0.png" in gone[0]["note"]
    assert (gone[0]["neighbours"], gone[0]["heat"]) == (0, 1)  # the query's map only


def test_a_running_server_searches_as_the_model_in_process(indexed) -> None:
    gallery, model_folder = indexed
    png = gallery.queries[2].read_bytes()
    local = LocalBackend(ServedModel.load(model_folder))
    seen_remotely = view_through_a_server(
        ModelRegistry.from_directory(model_folder.parent), SEARCH_MODEL, png
    )
    seen_locally = explain_view(local, png, method="gradfam")
    local.close()
    assert seen_locally["kind"] == "search" and len(seen_locally["items"]) == TOP_K
    assert seen_remotely == seen_locally


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--port", "70000"], "--port must be in [0, 65535], got 70000"),
        (["--references", "no/such/folder"], "references: no/such/folder is not a folder"),
        (["--token-file", "token"], "--token-file needs --server"),
        (["--model", "no-such-model"], "no-such-model"),
    ],
)
def test_fam_ui_refuses_bad_arguments_in_one_line(capsys, arguments, message) -> None:
    from fam_core.cli import main

    assert main(["ui", *arguments]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("fam: error: ") and message in error


def test_fam_ui_without_a_reachable_server_says_so_in_one_line(capsys) -> None:
    from fam_core.cli import main

    port = free_port()
    assert main(["ui", "--server", f"127.0.0.1:{port}", "--model", "default-classifier"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"server 127.0.0.1:{port}" in error


def test_fam_ui_serves_the_page_until_stopped() -> None:
    command = [sys.executable, "-m", "fam_core", "ui", "--model", "default-classifier"]
    with default_sigint_in_children():
        process = subprocess.Popen([*command, "--port", "0"], stderr=subprocess.PIPE, text=True)
    try:
        line = process.stderr.readline()
        url = line.split()[2]
        with urllib.request.urlopen(url + "api/model", timeout=30) as answer:
            described = json.load(answer)
        with urllib.request.urlopen(url, timeout=30) as answer:
            page = answer.read().decode()
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 130
    assert line.startswith("fam ui: http://127.0.0.1:")
    assert (described["name"], described["kind"]) == ("default-classifier", "classes")
    assert 'id="file"' in page and 'id="opacity"' in page and 'id="method"' in page


def test_a_small_gallery_shows_what_the_index_search_shows(indexed) -> None:
    """The same neighbours, scores and maps from two paths of the pipeline: ``Search`` on the
    index, and ``Explain`` requests with the gallery's images as references."""
    gallery, model_folder = indexed
    png = gallery.queries[2].read_bytes()
    backend = LocalBackend(ServedModel.load(model_folder))
    try:
        searched = explain_view(backend, png, top_k=3)
        referenced = explain_view(backend, png, top_k=3, gallery=load_gallery(gallery.root))
    finally:
        backend.close()
    assert (searched["kind"], referenced["kind"]) == ("search", "gallery")
    assert searched["query"] == referenced["query"]
    for found, given in zip(searched["items"], referenced["items"], strict=True):
        assert (found["id"], found["label"]) == (given["id"], given["label"])
        assert found["score"] == pytest.approx(given["score"], abs=1e-5)
        assert found["image"] == given["image"]
        for layer in ("query_map", "reference_map"):  # jet colours of float16 maps
            difference = _colours(found[layer]).astype(int) - _colours(given[layer])
            assert np.abs(difference).max() <= 8


def _colours(data_url: str) -> np.ndarray:
    png = base64.b64decode(data_url.removeprefix("data:image/png;base64,"))
    return np.array(Image.open(io.BytesIO(png)))


def test_knn_page_shows_the_classes_of_the_neighbours_vote_each_with_a_map(page, indexed) -> None:
    gallery, model_folder = indexed
    knn_folder = write_model(
        model_folder.parent, KNN_MODEL, task="knn", index="../../g.db", k=KNN_K, prototypes=None
    )
    served = ServedModel.load(knn_folder)
    classes = served.labels
    query = gallery.queries[0]
    viewer = ViewerServer(LocalBackend(served), port=0)
    viewer.start()
    try:
        cards = drop_image(page, viewer, query, len(classes))  # 3 classes: fewer than 5
    finally:
        viewer.stop()
    pngs = [gallery.path(i).read_bytes() for i in gallery.ids]
    outputs = model_outputs("default-embedding", [query.read_bytes(), *pngs])
    labels = torch.tensor([classes.index(label) for label in gallery.labels])
    votes = knn_predict(outputs[:1], outputs[1:], labels, k=KNN_K, temperature=0.07).votes[0]
    values, indices = (votes / votes.sum()).topk(len(classes))
    assert [c["label"] for c in cards] == [classes[i] for i in indices.tolist()]
    for card, value in zip(cards, values.tolist(), strict=True):
        assert card["score"] == pytest.approx(value, abs=10**-SCORE_DIGITS)
        assert card["heat"] == 1
