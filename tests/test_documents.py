"""Visual documents: a PDF page is an input (`{"pdf": path, "page": n}`, `"doc.pdf#page=n"`), rendered with pypdfium2
at the recipe's resolution; bad PDFs are named; a folder of PDFs is a corpus searched page by page, the search
command printing file and page."""

import os

import pytest
import torch

from media_fixtures import draw_page, moving_shape_frames, write_pdf, write_video
from modeling_puma import PumaForEmbedding, featurize, parse_input
from numerics import assert_close


pdfium = pytest.importorskip("pypdfium2", reason="PDF pages are rendered with pypdfium2 (pip install pypdfium2)")

FORWARD_ULPS = 100


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    """A folder `docs/` of two PDFs (3 pages, 1 page), a video, an image and a text file."""
    root = tmp_path_factory.mktemp("documents")
    (root / "docs" / "more").mkdir(parents=True)
    write_pdf(root / "docs" / "report.pdf", [draw_page(n) for n in (1, 2, 3)])
    write_pdf(root / "docs" / "more" / "memo.pdf", [draw_page(7)])
    write_video(root / "docs" / "clip.mp4", moving_shape_frames(8))
    draw_page(9).save(root / "docs" / "scan.png")
    (root / "docs" / "notes.txt").write_text("quarterly revenue by region")
    return root


def rendered(path, page: int, dpi: float = 200):
    document = pdfium.PdfDocument(str(path))
    try:
        return document[page - 1].render(scale=dpi / 72).to_pil().convert("RGB")
    finally:
        document.close()


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=2)


def test_a_pdf_page_is_that_page_rendered_at_the_recipes_resolution(model, documents):
    report, memo = documents / "docs" / "report.pdf", documents / "docs" / "more" / "memo.pdf"
    assert model.config.pdf_dpi == 200
    page_two = rendered(report, 2)
    assert page_two.size == (556, 723)  # 200 x 260 points at 200 dpi
    embeddings = model.encode([{"pdf": str(report), "page": 2}, f"{report}#page=2", {"image": f"{report}#page=2"},
                               page_two, str(memo), {"pdf": memo, "text": "a memo"},
                               {"text": "a memo", "image": rendered(memo, 1)}])
    assert_close(embeddings[:3], embeddings[3:4].expand(3, -1), ulps=FORWARD_ULPS)
    assert_close(embeddings[4], model.encode(rendered(memo, 1)), ulps=FORWARD_ULPS)  # one page: no page needed
    assert_close(embeddings[5], embeddings[6], ulps=FORWARD_ULPS)
    assert (embeddings[0] - model.encode(rendered(report, 3))).abs().max() > 1e-3  # another page

    def image_tokens(dpi):
        low = PumaForEmbedding.from_pretrained(model.name_or_path, num_layers=2, pdf_dpi=dpi) if dpi else model
        text, visual = parse_input({"pdf": str(report), "page": 1}, 0, config=low.config)
        features = featurize(low.processor, low.config, [low.build_prompt(text, visual)], [visual])
        return int((features["input_ids"] == low.config.image_token_id).sum())

    # at 36 dpi the page (100 x 130 pixels) is below max_pixels, so fewer image tokens than at 200 dpi
    assert image_tokens(36) < image_tokens(None)


@pytest.mark.parametrize("item,error,match", [
    ("{report}", ValueError, r"report\.pdf' has 3 pages; name one with \{'pdf': path, 'page': n\}"),
    ({"pdf": "{report}", "page": 4}, ValueError,
     r"report\.pdf' has 3 pages; there is no page 4 \(pages are numbered from 1\)"),
    ({"pdf": "{report}", "page": 0}, ValueError, r"there is no page 0"),
    ("{report}#page=9", ValueError, r"there is no page 9"),
    ({"pdf": "{report}", "page": "2"}, ValueError, r"\['page'\] must be an integer"),
    ({"text": "x", "page": 2}, ValueError, r"\['page'\] applies to a 'pdf' input only"),
    ("/no/such/file.pdf", FileNotFoundError, r"PDF file '/no/such/file\.pdf' does not exist"),
    ("{notes_pdf}", ValueError, r"notes\.pdf' is not a readable PDF"),
])
def test_bad_pdf_inputs_raise_naming_the_file(model, documents, tmp_path, item, error, match):
    (tmp_path / "notes.pdf").write_text("not a PDF")
    paths = {"report": str(documents / "docs" / "report.pdf"), "notes_pdf": str(tmp_path / "notes.pdf")}
    if isinstance(item, str):
        item = item.format(**paths)
    else:
        item = {key: value.format(**paths) if key == "pdf" else value for key, value in item.items()}
    with pytest.raises(error, match=match):
        model.encode([item])


def test_an_oversized_page_rendering_is_refused(model, documents):
    with pytest.raises(ValueError, match=r"page 1 of .*report\.pdf' renders to 556x723 pixels at 200 dpi, over the "
                                         r"limit of 10000; lower pdf_dpi or raise max_image_pixels"):
        model.encode([{"pdf": str(documents / "docs" / "report.pdf"), "page": 1}], max_image_pixels=10_000)


def test_a_folder_corpus_holds_each_pdf_page_each_video_image_and_text(documents):
    from puma_eval.corpus import load_corpus

    ids, items, root = load_corpus(documents / "docs")
    assert ids == ["clip.mp4", "notes.txt", "report.pdf#page=1", "report.pdf#page=2", "report.pdf#page=3",
                   "scan.png", "more/memo.pdf#page=1"]
    assert items[0] == {"text": None, "image": None, "video": "clip.mp4"}
    assert items[3] == {"text": None, "image": None, "pdf": "report.pdf", "page": 2}
    assert items[1]["text"] == "quarterly revenue by region" and items[5]["image"] == "scan.png"


def test_a_jsonl_corpus_names_pages_or_expands_a_whole_pdf(documents, tmp_path):
    import json

    from puma_eval.corpus import load_corpus

    listing = documents / "docs" / "listing.jsonl"
    listing.write_text("\n".join(json.dumps(record) for record in [
        {"id": "r2", "pdf": "report.pdf", "page": 2, "text": "page two"}, {"id": "memo", "pdf": "more/memo.pdf"},
        {"id": "clip", "video": "clip.mp4"}]))
    try:
        ids, items, root = load_corpus(listing)
    finally:
        listing.unlink()
    assert ids == ["r2", "memo#page=1", "clip"]
    assert items[0] == {"text": "page two", "image": None, "pdf": "report.pdf", "page": 2}
    assert root == str(documents / "docs")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "a.png", "video": "b.mp4"}) + "\n")
    with pytest.raises(ValueError, match=r"record 1: image and video; a record holds one of them"):
        load_corpus(bad)


def test_search_over_a_folder_of_pdfs_prints_file_and_page(tiny_checkpoint, documents, tmp_path, capsys):
    pytest.importorskip("faiss", reason="search indexes with faiss")
    from eval_puma import main

    folder = tmp_path / "tiny-puma"
    PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=2).save_pretrained(folder)
    query = tmp_path / "page2.png"  # the page itself: its embedding is the page item's, the top hit
    rendered(documents / "docs" / "report.pdf", 2).save(query)
    main(["search", "--model", str(folder), "--corpus", str(documents / "docs"), "--image", str(query), "--top-k", "3"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["rank", "score", "id", "content"]
    rank, score, item_id, *content = lines[1].split()
    assert (rank, item_id, " ".join(content)) == ("1", "report.pdf#page=2", "[page 2 of report.pdf]")
    assert float(score) == pytest.approx(1.0, abs=1e-4)
    assert len(lines) == 4
    # a video query finds the video
    main(["search", "--model", str(folder), "--corpus", str(documents / "docs"), "--video",
          str(documents / "docs" / "clip.mp4"), "--top-k", "1"])
    assert capsys.readouterr().out.splitlines()[1].split()[2:] == ["clip.mp4", "[video", "clip.mp4]"]
