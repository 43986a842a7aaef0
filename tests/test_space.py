# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""The Space: `space/app.py` served by Gradio and driven in headless Chromium (type a query, read the result
gallery, keep a screenshot), the written Space folder, and the offline push."""

import importlib.util
import os
import shutil
import socket
import sys
import time

import pytest
import torch

from conftest import ROOT
from puma_eval.corpus import CorpusIndex


gr = pytest.importorskip("gradio", reason="the Space needs gradio (pip install -e '.[space]')")
pytest.importorskip("faiss", reason="the Space searches with faiss")

pytest_plugins = ("eval_fixtures",)  # puma_checkpoint, model

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
# Headless, and nothing but the page under test: no GPU, no background requests, a fresh profile.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,1400")
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 40, 220), "yellow": (230, 210, 30)}
TEXTS = {"beach": "a dog running on the beach", "city": "tall buildings in a city at night",
         "forest": "a path through a green forest"}


def load_app():
    spec = importlib.util.spec_from_file_location("space_app", os.path.join(ROOT, "space", "app.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    from PIL import Image, ImageDraw

    root = tmp_path_factory.mktemp("gallery")
    (root / "photos").mkdir()
    for name, colour in COLOURS.items():
        image = Image.new("RGB", (64, 48), (250, 250, 250))
        ImageDraw.Draw(image).ellipse([6, 4, 58, 44], fill=colour)
        image.save(root / "photos" / f"{name}.png")
    for name, text in TEXTS.items():
        (root / f"{name}.txt").write_text(text)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Chromium and its driver: apt-get install chromium "
                                                            "chromium-driver (CI installs them)")
def test_space_page_shows_the_ranked_gallery_in_a_browser(model, gallery, tmp_path, monkeypatch):
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test drives Chromium with selenium")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    app = load_app()
    index = CorpusIndex.from_path(model, gallery)
    query = "a red circle"
    # the expected ranking: brute force over the gallery with encode
    embeddings = model.encode([{"text": item["text"], "image": os.path.join(gallery, item["image"])
                                if item["image"] else None} for item in index.items])
    scores = embeddings @ model.encode([query], is_query=True)[0]
    order = torch.argsort(-scores)[:5].tolist()
    expected_ids, expected_scores = [index.ids[i] for i in order], [float(scores[i]) for i in order]

    demo = app.build_demo(index, "PUMA search test", top_k=5)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, theme=app.theme())
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 60)
        box = wait.until(expected_conditions.element_to_be_clickable((By.CSS_SELECTOR, "#query-text textarea")))
        box.send_keys(query)
        driver.find_element(By.CSS_SELECTOR, "#search").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .caption-label")) >= 5)
        time.sleep(0.5)  # let the thumbnails paint before the screenshot
        screenshot = os.path.join(os.environ.get("PUMA_TEST_ARTIFACTS", str(tmp_path)), "space_search.png")
        os.makedirs(os.path.dirname(screenshot), exist_ok=True)
        driver.save_screenshot(screenshot)
        print(f"screenshot of the Space page: {screenshot}")
        captions = [element.text for element in driver.find_elements(By.CSS_SELECTOR, "#results .caption-label")]
        thumbnails = driver.find_elements(By.CSS_SELECTOR, "#results img")
        loaded = [driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image)
                  for image in thumbnails]
    finally:
        driver.quit()
        demo.close()
    # the gallery shows the expected items, best first, captioned "rank. id (score)"
    parsed = [caption.split(". ", 1)[1].rsplit(" (", 1) for caption in captions]
    assert [item_id for item_id, _ in parsed] == expected_ids
    assert [float(score.rstrip(")")) for _, score in parsed] == pytest.approx(expected_scores, abs=1.5e-3)
    assert [caption.split(".")[0] for caption in captions] == ["1", "2", "3", "4", "5"]
    assert len(loaded) == 5 and all(loaded)  # every thumbnail was served and decoded
    assert os.path.getsize(screenshot) > 10_000


def test_space_search_function_returns_captioned_thumbnails_and_rejects_an_empty_query(model, gallery):
    from PIL import Image

    app = load_app()
    index = CorpusIndex.from_path(model, gallery)
    demo = app.build_demo(index, top_k=3)
    search = next(fn for fn in demo.fns.values() if fn.name == "search").fn
    image = Image.open(gallery / "photos" / "green.png")
    thumbnails, table = search("", image, "", 3)
    hits = index.search(None, image, 3)
    assert [caption for _, caption in thumbnails] == [f"{h['rank']}. {h['id']} ({h['score']:.3f})" for h in hits]
    assert [row[2] for row in table] == [hit["id"] for hit in hits]
    assert all(isinstance(thumb, Image.Image) and max(thumb.size) <= 256 for thumb, _ in thumbnails)
    with pytest.raises(gr.Error, match="Type a query, give an image or a video, or both"):
        search("  ", None, "", 3)


def test_space_searches_document_pages_and_videos_by_text_image_or_video(model, tmp_path):
    pytest.importorskip("pypdfium2", reason="PDF pages are rendered with pypdfium2")
    pytest.importorskip("av", reason="videos are decoded with PyAV")
    from PIL import Image

    from media_fixtures import draw_page, moving_shape_frames, write_pdf, write_video

    write_pdf(tmp_path / "report.pdf", [draw_page(n) for n in (1, 2, 3)])
    write_video(tmp_path / "clip.mp4", moving_shape_frames(8))
    (tmp_path / "notes.txt").write_text("quarterly revenue by region")
    app = load_app()
    index = CorpusIndex.from_path(model, tmp_path)
    demo = app.build_demo(index, top_k=3)
    assert "Search 5 videos, document pages and texts" in next(
        block.value for block in demo.blocks.values() if isinstance(block, gr.Markdown))
    search = next(fn for fn in demo.fns.values() if fn.name == "search").fn
    # the query is page 2 itself, so it is the top hit: the gallery shows that page and names file and page
    from modeling_puma import load_pdf_page

    page = load_pdf_page(str(tmp_path / "report.pdf"), 2, "page 2")
    thumbnails, table = search("", page, "", 3)
    assert table[0][2] == "report.pdf#page=2" and thumbnails[0][1].startswith("1. report.pdf#page=2 (1.000)")
    assert all(isinstance(thumb, Image.Image) and max(thumb.size) <= 256 for thumb, _ in thumbnails)
    thumbnails, table = search("", None, "", 2, str(tmp_path / "clip.mp4"))
    assert table[0][2] == "clip.mp4" and thumbnails[0][0].size == (64, 48)  # the video's middle frame
    with pytest.raises(gr.Error, match="Give an image or a video, not both"):
        search("", page, "", 2, str(tmp_path / "clip.mp4"))


def test_space_folder_has_app_modules_gallery_requirements_and_metadata(gallery, tmp_path):
    import subprocess

    from huggingface_hub import SpaceCard

    from space_puma import save_space_folder

    folder = tmp_path / "space"
    save_space_folder(folder, "my-org/puma-2b", gallery=str(gallery), instruction="Find it.", top_k=4)
    card = SpaceCard.load(folder / "README.md")
    assert card.data.sdk == "gradio" and card.data.app_file == "app.py" and card.data.models == ["my-org/puma-2b"]
    assert card.data.sdk_version == gr.__version__
    assert {"app.py", "space_config.json", "requirements.txt", "modeling_puma.py", "mbeir_puma.py", "puma_eval",
            "gallery"} <= set(os.listdir(folder))
    assert "faiss-cpu" in (folder / "requirements.txt").read_text()
    assert sorted(os.listdir(folder / "gallery" / "photos")) == sorted(f"{name}.png" for name in COLOURS)
    # the written Space stands on its own: its app finds its modules, config and gallery in its own folder
    code = ("import app; c = app.load_config(); "
            "print(c['model'], c['top_k'], len(app.load_gallery(c['gallery'])[0]))")
    result = subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
                                 "PYTHONPATH": str(folder)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-3:] == ["my-org/puma-2b", "4", str(len(COLOURS) + len(TEXTS))]


def test_push_space_fails_fast_offline_naming_the_space(monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants
    from space_puma import push_space

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets when huggingface_hub loads
    monkeypatch.setattr(huggingface_hub, "get_session", lambda: pytest.fail("offline, no request may be sent"))
    with pytest.raises(ConnectionError, match=r"Cannot push to .me/puma-search.*save_space_folder\(\)"):
        push_space("me/puma-search", "my-org/puma-2b")


# ---- galleries in every form the README names, and the page's header ----------------------------------------------
def gallery_config(monkeypatch, gallery_setting):
    """`load_config()` of the app with PUMA_GALLERY set as a user types it."""
    monkeypatch.setenv("PUMA_MODEL", "my-org/puma-2b")
    monkeypatch.setenv("PUMA_GALLERY", gallery_setting)
    return load_app().load_config()


def assert_images_and_captions(app, config, gallery):
    ids, items, root = app.load_gallery(config["gallery"], config["gallery_split"])
    texts = {item_id: item["text"] for item_id, item in zip(ids, items) if item["text"]}
    assert texts == {f"{name}.txt": text for name, text in TEXTS.items()}  # the .txt files are items, not dropped
    assert sorted(item_id for item_id, item in zip(ids, items) if item["image"]) == \
        sorted(f"photos/{name}.png" for name in COLOURS)
    assert root == str(gallery)


def test_a_relative_gallery_folder_is_read_from_the_working_directory(gallery, monkeypatch):
    monkeypatch.chdir(gallery.parent)
    config = gallery_config(monkeypatch, f"{gallery.name}/")  # as in the README: PUMA_GALLERY=photos/
    assert config["gallery"] == str(gallery)
    assert_images_and_captions(load_app(), config, gallery)


def test_an_absolute_gallery_folder_is_read_wherever_the_app_starts(gallery, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = gallery_config(monkeypatch, str(gallery))
    assert_images_and_captions(load_app(), config, gallery)


def test_a_relative_gallery_that_does_not_exist_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"Gallery photos/: {tmp_path}/photos does not exist"):
        gallery_config(monkeypatch, "photos/")


def test_a_jsonl_gallery_reads_its_records_with_images_relative_to_the_file(gallery, monkeypatch):
    import json

    (gallery / "gallery.jsonl").write_text("\n".join(json.dumps(record) for record in [
        {"id": "red", "image": "photos/red.png", "text": "a red circle"}, {"id": "beach", "text": TEXTS["beach"]}]))
    monkeypatch.chdir(gallery)
    app = load_app()
    ids, items, root = app.load_gallery(gallery_config(monkeypatch, "gallery.jsonl")["gallery"])
    assert ids == ["red", "beach"] and root == str(gallery)
    assert items == [{"text": "a red circle", "image": "photos/red.png"}, {"text": TEXTS["beach"], "image": None}]


def captioned_images():
    from PIL import Image

    return [(Image.new("RGB", (40, 32), colour), f"a {name} picture") for name, colour in COLOURS.items()]


def test_a_saved_datasets_gallery_with_an_image_and_a_caption_column_is_searched_with_and_without_a_cache(
        model, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")

    images, captions = zip(*captioned_images())
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": list(images), "caption": list(captions)}, features=features).save_to_disk(
        str(tmp_path / "saved"))
    monkeypatch.chdir(tmp_path)
    app = load_app()
    ids, items, root = app.load_gallery(gallery_config(monkeypatch, "saved")["gallery"])
    assert ids == [str(i) for i in range(len(COLOURS))] and root is None
    assert [item["text"] for item in items] == list(captions)
    assert all(item["image"].size == (40, 32) for item in items)  # decoded PIL images
    # the embeddings' fingerprint reads PIL images: a cached index is written, then reused; none without a cache
    first = CorpusIndex(model, ids, items, root, cache_dir=tmp_path / "cache")
    again = CorpusIndex(model, ids, items, root, cache_dir=tmp_path / "cache")
    in_memory = CorpusIndex(model, ids, items, root)
    hits = [index.search("a green picture", top_k=3) for index in (first, again, in_memory)]
    assert [hit["id"] for hit in hits[0]] == [hit["id"] for hit in hits[1]] == [hit["id"] for hit in hits[2]]
    search = next(fn for fn in app.build_demo(first, top_k=3).fns.values() if fn.name == "search").fn
    thumbnails, table = search("a green picture", None, "", 3)
    assert [row[2] for row in table] == [hit["id"] for hit in hits[0]] and len(thumbnails) == 3


def test_an_image_folder_with_a_metadata_file_keeps_its_captions(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    import json

    folder = tmp_path / "captioned"
    folder.mkdir()
    records = []
    for index, (image, caption) in enumerate(captioned_images()):
        image.save(folder / f"{index}.png")
        records.append({"file_name": f"{index}.png", "caption": caption})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(record) for record in records))
    app = load_app()
    ids, items, _ = app.load_gallery(gallery_config(monkeypatch, str(folder))["gallery"])
    assert sorted(item["text"] for item in items) == sorted(caption for _, caption in captioned_images())
    assert all(item["image"] is not None for item in items) and len(ids) == len(COLOURS)


def test_the_header_names_the_loaded_model_its_family_and_its_layers(model, gallery):
    from types import SimpleNamespace

    app = load_app()
    demo = app.build_demo(CorpusIndex.from_path(model, gallery))
    header = next(block.value for block in demo.blocks.values() if isinstance(block, gr.Markdown))
    assert f"`{model.name_or_path}`" in header and "2 of the 6 decoder layers of a Qwen2-VL model" in header
    other = SimpleNamespace(name_or_path="org/puma-qwen3", config=SimpleNamespace(
        base_model_type="qwen3_vl_moe", kept_layers=list(range(48)), base_num_hidden_layers=48))
    assert app.model_description(other) == "`org/puma-qwen3`: PUMA embeddings from all 48 decoder layers of a " \
                                           "Qwen3-VL-MoE model"
