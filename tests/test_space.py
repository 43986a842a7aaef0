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
    index = app.CorpusIndex.from_path(model, gallery)
    query = "a red circle"
    # the expected ranking: brute force over the gallery with encode
    embeddings = model.encode([{"text": item["text"], "image": os.path.join(gallery, item["image"])
                                if item["image"] else None} for item in index.items])
    scores = embeddings @ model.encode([query], is_query=True)[0]
    order = torch.argsort(-scores)[:5].tolist()
    expected_ids, expected_scores = [index.ids[i] for i in order], [float(scores[i]) for i in order]

    demo = app.build_demo(index, "PUMA search test", top_k=5)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, theme=app.THEME)
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
    index = app.CorpusIndex.from_path(model, gallery)
    demo = app.build_demo(index, top_k=3)
    search = next(fn for fn in demo.fns.values() if fn.name == "search").fn
    image = Image.open(gallery / "photos" / "green.png")
    thumbnails, table = search("", image, "", 3)
    hits = index.search(None, image, 3)
    assert [caption for _, caption in thumbnails] == [f"{h['rank']}. {h['id']} ({h['score']:.3f})" for h in hits]
    assert [row[2] for row in table] == [hit["id"] for hit in hits]
    assert all(isinstance(thumb, Image.Image) and max(thumb.size) <= 256 for thumb, _ in thumbnails)
    with pytest.raises(gr.Error, match="Type a query, give an image, or both"):
        search("  ", None, "", 3)


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
    import hub_puma
    from huggingface_hub import constants
    from space_puma import push_space

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets when huggingface_hub loads
    monkeypatch.setattr(hub_puma, "get_session", lambda: pytest.fail("offline, no request may be sent"))
    with pytest.raises(ConnectionError, match=r"Cannot push to .me/puma-search.*save_space_folder\(\)"):
        push_space("me/puma-search", "my-org/puma-2b")
