"""Videos as inputs: decoding every container, qwen-vl-utils' sampling rules, the input forms of `encode`, bad videos
named in errors, and exactness on video: for every family the pruned model equals transformers' own full model
after layer k (Qwen3-VL below, at and above its DeepStack taps), and the trained-embedder recipes at full depth
equal their published code's steps (Qwen3-VL-Embedding's with qwen-vl-utils; GME's template) on videos."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image

from conftest import TINY_DEPTH
from media_fixtures import decode_all, moving_shape_frames, write_video
from modeling_puma import (PumaForEmbedding, VideoInput, decode_video, featurize, parse_input, qwen_vl_smart_resize,
                           resize_frames, sample_video)
from numerics import assert_close
from test_modeling import oracle


pytest.importorskip("av", reason="video files are written and decoded with PyAV (pip install av)")

# Two code paths that round differently (ours and transformers' or a reference's): 100 float32 ulps, as for images
FORWARD_ULPS = 100


def small_video(family: str) -> dict:
    """Recipe overrides that keep a tiny model's videos small: at most 4 frames of 4 to 16 merged patches."""
    factor = 32 if family.startswith("qwen3_vl") else 28
    return {"video_max_frames": 4, "video_min_pixels": 4 * factor ** 2, "video_max_pixels": 16 * factor ** 2,
            "video_total_pixels": 32 * factor ** 2}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """`{name: path}`: a red square moving right (12 frames, 10 fps) in every container, a blue circle moving down
    (20 frames, 64x48) as mp4, and a still GIF."""
    root = tmp_path_factory.mktemp("clips")
    square = moving_shape_frames(12)
    paths = {suffix: write_video(root / f"square{suffix}", square)
             for suffix in (".mp4", ".webm", ".mkv", ".mov", ".avi", ".gif")}
    paths["circle"] = write_video(root / "circle.mp4", moving_shape_frames(20, shape="circle", colour="blue",
                                                                             direction=(0, 1)))
    Image.fromarray(square[0]).save(root / "still.gif")
    paths["still"] = str(root / "still.gif")
    return paths


def frames_of(path) -> list[Image.Image]:
    return [Image.fromarray(frame) for frame in decode_all(path)]


# ---------------------------------------------------------------------------------------------------------------
# Decoding and the sampling rules
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".mkv", ".mov", ".avi"])
def test_every_container_decodes_to_the_frames_written(clips, suffix):
    import av

    written = moving_shape_frames(12)
    with av.open(clips[suffix]) as container:
        listed = container.streams.video[0].frames  # 0 for WebM and MKV: not trusted
    frames, indices, total, fps = decode_video(clips[suffix], lambda total, fps: [0, 5, 11])
    assert (total, fps, indices) == (12, 10.0, [0, 5, 11])
    assert listed in (0, 12)
    # lossless codecs: the very pixels written
    assert torch.equal(frames, torch.from_numpy(np.stack([written[i] for i in (0, 5, 11)])).permute(0, 3, 1, 2))


def test_frame_counts_and_indices_are_qwen_vl_utils(clips):
    from qwen_vl_utils.vision_process import smart_nframes

    from modeling_puma import _frame_count

    model_config = PumaForEmbedding.config_class(video_min_frames=4, video_max_frames=64)
    for total in (2, 3, 7, 12, 20, 64, 150, 1000):
        for source_fps in (10.0, 24.0, 29.97, 60.0):
            for fps in (0.5, 1.0, 2.0):
                ele = {"fps": fps, "min_frames": 4, "max_frames": 64}
                try:
                    expected = smart_nframes(ele, total_frames=total, video_fps=source_fps)
                except ValueError:  # fewer than 2 frames: qwen-vl-utils raises, the frame is repeated here
                    expected = 0
                assert _frame_count(total, source_fps, fps, model_config, 64) == expected, (total, source_fps, fps)


def test_frame_resize_is_torchvisions_bicubic_antialiased_resize():
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    frames = torch.randint(0, 256, (4, 3, 37, 53), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for size in ((64, 96), (32, 32), (37, 53), (128, 160)):
        expected = TF.resize(frames, list(size), interpolation=InterpolationMode.BICUBIC, antialias=True).float()
        assert torch.equal(resize_frames(frames, *size), expected), size


def test_smart_resize_is_qwen_vl_utils():
    from qwen_vl_utils.vision_process import smart_resize

    for height, width in ((48, 64), (720, 1280), (1080, 1920), (30, 400), (1, 150), (2000, 13)):
        for factor, min_pixels, max_pixels in ((28, 128 * 28 * 28, 768 * 28 * 28), (32, 4 * 1024, 245_760),
                                               (64, 4 * 64 * 64, 16384 * 64 * 64)):
            assert qwen_vl_smart_resize(height, width, factor, min_pixels, max_pixels) == \
                smart_resize(height, width, factor, min_pixels, max_pixels), (height, width, factor)


# ---------------------------------------------------------------------------------------------------------------
# The inputs of encode
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def video_model(tiny_checkpoint):
    return PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=2, **small_video("qwen2_vl"))


def test_a_video_is_a_path_a_list_of_frames_an_array_or_a_dict(video_model, clips, tmp_path):
    model = video_model
    path = clips[".mp4"]
    by_path = model.encode([path, os.path.abspath(path), {"video": path}, type(tmp_path)(path)])
    assert_close(by_path, by_path[:1].expand(4, -1), ulps=FORWARD_ULPS)
    frames = frames_of(path)
    arrays = [np.asarray(frame) for frame in frames]
    by_frames = model.encode([frames, {"video": frames}, np.stack(arrays),
                              torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2), {"video": arrays}])
    assert_close(by_frames, by_frames[:1].expand(5, -1), ulps=FORWARD_ULPS)
    # a frame list is thinned to 4 frames, a file sampled at 2 fps: other frames, so another embedding
    assert (by_frames[0] - by_path[0]).abs().max() > 1e-4


def test_a_video_with_a_text_and_its_own_sampling(video_model, clips):
    model = video_model
    path = clips["circle"]
    alone, with_text = model.encode([path, {"video": path, "text": "a blue circle moving down"}])
    assert (alone - with_text).abs().max() > 1e-3
    prompt = model.build_prompt("a blue circle", "video")
    assert "<|vision_start|><|video_pad|><|vision_end|>A blue circle.\nSummarize above video and sentence" in prompt

    def frames_sampled(item) -> int:
        text, visual = parse_input(item, 0, config=model.config)
        features = featurize(model.processor, model.config, [model.build_prompt(text, visual)], [visual])
        return int(features["video_grid_thw"][0, 0]) * 2

    # 20 frames at 10 fps: 2 fps gives 4 (the cap); a frame cap of its own, and a rate of its own, change that
    assert frames_sampled(path) == 4
    assert frames_sampled({"video": path, "fps": 1.0, "max_frames": 2}) == 2
    sampled = sample_video(VideoInput(path, "clip", fps=0.5, max_frames=8), model.config)
    assert sampled.metadata["frames_indices"] == [0, 6, 13, 19] and sampled.metadata["total_num_frames"] == 20


def test_an_animated_gif_is_a_video_and_a_still_gif_an_image(video_model, clips):
    text, visual = parse_input(clips[".gif"], 0, config=video_model.config)
    assert isinstance(visual, VideoInput) and text is None
    _, still = parse_input(clips["still"], 0, config=video_model.config)
    assert isinstance(still, Image.Image)
    _, first_frame = parse_input({"image": clips[".gif"]}, 0)
    assert isinstance(first_frame, Image.Image)
    assert video_model.encode([clips[".gif"], clips["still"]]).shape == (2, 64)


@pytest.mark.parametrize("item,error,match", [
    ({"video": "/no/such/clip.mp4"}, FileNotFoundError, r"video file '/no/such/clip\.mp4' does not exist"),
    ("/no/such/clip.webm", FileNotFoundError, r"'/no/such/clip\.webm' does not exist"),
    ("https://example.com/clip.mp4", ValueError, r"is a URL; URLs are not fetched\. Download the video first"),
    ({"video": [], "text": "x"}, ValueError, r"inputs\[0\]: the video has no frames"),
    ({"image": "a.png", "video": "b.mp4"}, ValueError, r"has 'image' and 'video'; an input holds one image, video"),
    ({"text": "x", "fps": 2}, ValueError, r"\['fps'\] applies to a 'video' input only"),
    ({"video": np.zeros((2, 8, 8), np.uint8)}, ValueError, r"must have 4 dimensions"),
    ({"video": "CLIP", "fps": 0}, ValueError, r"\['fps'\] must be a positive number"),
])
def test_bad_video_inputs_raise(video_model, item, error, match):
    with pytest.raises(error, match=match):
        video_model.encode([item])


def test_unreadable_empty_and_oversized_videos_raise_naming_the_file(video_model, clips, tmp_path):
    import av

    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    audio_only = tmp_path / "audio.mkv"
    with av.open(str(audio_only), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in list(stream.encode(frame)) + list(stream.encode()):
            container.mux(packet)
    for path, match in ((garbage, r"garbage\.mp4\) is not a readable video"),
                        (empty, r"empty\.mp4\) is not a readable video"),
                        (audio_only, r"audio\.mkv\) has no video stream")):
        with pytest.raises(ValueError, match=match):
            video_model.encode([str(path)])
    with pytest.raises(ValueError, match=r"square\.mkv\) has 64x48 = 3072 pixels per frame, over the limit of 1000"):
        video_model.encode([clips[".mkv"]], max_image_pixels=1000)
    with pytest.raises(ValueError, match=r"inputs\[0\] frame 0.* over the limit of 1000"):
        video_model.encode([{"video": frames_of(clips[".mkv"])}], max_image_pixels=1000)
    frames = frames_of(clips[".mp4"])
    with pytest.raises(ValueError, match=r"inputs\[1\]: its frames differ in size"):
        video_model.encode(["a text", {"video": [frames[0], frames[1].resize((256, 96))]}])


# ---------------------------------------------------------------------------------------------------------------
# Exactness: the pruned model on video is the full model after layer k
# ---------------------------------------------------------------------------------------------------------------
def video_inputs_of_every_kind(clips, images):
    """A video file, a video with a text, a frame list, a text and an image, of different lengths (padded rows)."""
    return [clips[".mp4"], {"video": clips["circle"], "text": "a blue circle moving down the frame"},
            {"video": frames_of(clips[".webm"])[:5]}, "a red square", images[0]]


def video_features(model, inputs):
    examples = [parse_input(item, i, config=model.config) for i, item in enumerate(inputs)]
    prompts = [model.build_prompt(text, visual) for text, visual in examples]
    return featurize(model.processor, model.config, prompts, [visual for _, visual in examples])


@pytest.mark.parametrize("family,k", [
    ("qwen2_vl", 3), ("qwen2_5_vl", 2),
    # the tiny Qwen3-VL injects DeepStack features after layers 0, 1 and 2: k below, at and above that count
    ("qwen3_vl", 2), ("qwen3_vl", 3), ("qwen3_vl", 4), ("qwen3_vl_moe", 3),
])
def test_pruned_model_on_video_is_its_own_full_model_after_k_layers(family_checkpoints, clips, images, family, k):
    checkpoint = family_checkpoints[family]
    model = PumaForEmbedding.from_pretrained(checkpoint, num_layers=k, **small_video(family))
    inputs = video_inputs_of_every_kind(clips, images)
    if family == "qwen2_5_vl":  # transformers 5.4 to 5.1x cannot place a batch mixing images and videos (#45325)
        inputs = inputs[:-1]
    features = video_features(model, inputs)
    assert features["video_grid_thw"].shape[0] == 3 and (features["attention_mask"][:, -1] == 0).any()
    with torch.no_grad():
        raw = model(**features).raw_embeddings
    assert_close(raw, oracle(checkpoint, model, features, k), ulps=FORWARD_ULPS)


def test_video_depth_embeddings_from_one_pass_are_the_truncated_models(family_checkpoints, clips, images):
    checkpoint = family_checkpoints["qwen3_vl"]
    model = PumaForEmbedding.from_pretrained(checkpoint, **small_video("qwen3_vl"))
    features = video_features(model, video_inputs_of_every_kind(clips, images))
    with torch.no_grad():
        out = model(**features, output_depths=[1, 3, TINY_DEPTH])
    for depth in (1, 3, TINY_DEPTH):
        assert_close(out.depth_embeddings[depth], oracle(checkpoint, model, features, depth), ulps=FORWARD_ULPS)


# ---------------------------------------------------------------------------------------------------------------
# Trained embedders at full depth: their published code on video
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def pyav_video_reader(monkeypatch):
    """qwen-vl-utils' torchcodec reader (`_read_video_torchcodec`) with the frames decoded by PyAV (torchcodec needs
    FFmpeg's system libraries): every frame decoded, the rate from the stream header, the sampled frames at
    `torch.linspace(0, n - 1, smart_nframes(...)).round()`."""
    vision_process = pytest.importorskip("qwen_vl_utils.vision_process")

    def read(ele):
        import av

        path = ele["video"][len("file://"):] if ele["video"].startswith("file://") else ele["video"]
        frames = decode_all(path)
        with av.open(path) as container:
            video_fps = float(container.streams.video[0].average_rate)
        total = len(frames)
        nframes = vision_process.smart_nframes(ele, total_frames=total, video_fps=video_fps)
        indices = torch.linspace(0, total - 1, nframes).round().long().tolist()
        video = torch.from_numpy(np.stack([frames[i] for i in indices])).permute(0, 3, 1, 2)
        metadata = dict(fps=video_fps, frames_indices=indices, total_num_frames=total, video_backend="pyav")
        return video, metadata, nframes / total * video_fps

    monkeypatch.setitem(vision_process.VIDEO_READER_BACKENDS, "pyav", read)
    monkeypatch.setattr(vision_process, "get_video_reader_backend", lambda: "pyav")


def _last_token(hidden, attention_mask):
    column = attention_mask.shape[1] - attention_mask.flip(dims=[1]).argmax(dim=1) - 1
    return hidden[torch.arange(hidden.shape[0]), column]


def qwen3_vl_embedding_video_reference(checkpoint, inputs, instruction=None, max_frames=64):
    """Qwen3-VL-Embedding's `Qwen3VLEmbedder(max_frames=max_frames).process` (QwenLM/Qwen3-VL-Embedding
    `src/models/qwen3_vl_embedding.py`) on videos: a file is `{"type": "video", "video": "file://" + path, "fps": 1,
    "max_frames": max_frames}`, a frame list is thinned to `max_frames` (`sample_frames`) and given with
    `total_pixels=7_864_320`; content videos, then text; the
    chat template with the generation prompt; qwen-vl-utils' `process_vision_info(..., image_patch_size=16,
    return_video_metadata=True, return_video_kwargs=True)`; the processor with the videos' metadata,
    `do_resize=False`, `truncation=True, max_length=8192`; the last attended token, L2-normalised."""
    import unicodedata

    from qwen_vl_utils import process_vision_info

    processor = transformers.Qwen3VLProcessor.from_pretrained(checkpoint, padding_side="right")
    model = transformers.Qwen3VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).model.eval()
    if instruction:
        instruction = instruction.strip()
        if instruction and not unicodedata.category(instruction[-1]).startswith("P"):
            instruction += "."
    conversations = []
    for item in inputs:
        content = []
        video = item.get("video")
        if isinstance(video, list):
            if len(video) > max_frames:
                video = [video[i] for i in np.linspace(0, len(video) - 1, max_frames, dtype=int).tolist()]
            content.append({"type": "video", "video": video, "total_pixels": 7_864_320})
        elif video is not None:
            content.append({"type": "video", "video": "file://" + video, "fps": 1, "max_frames": max_frames})
        if item.get("text"):
            content.append({"type": "text", "text": item["text"]})
        conversations.append([
            {"role": "system", "content": [{"type": "text", "text": instruction or "Represent the user's input."}]},
            {"role": "user", "content": content}])
    text = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=False)
    images, video_inputs, video_kwargs = process_vision_info(conversations, image_patch_size=16,
                                                             return_video_metadata=True, return_video_kwargs=True)
    videos, video_metadata = zip(*video_inputs)
    batch = processor(text=text, images=images, videos=list(videos), video_metadata=list(video_metadata),
                      truncation=True, max_length=8192, padding=True, do_resize=False, return_tensors="pt",
                      **video_kwargs)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    return F.normalize(_last_token(hidden, batch["attention_mask"]), p=2, dim=-1)


def test_qwen3_vl_embedding_at_full_depth_is_its_published_code_on_video(embedder_checkpoints, clips,
                                                                          pyav_video_reader):
    checkpoint = embedder_checkpoints["qwen3_vl_embedding"]
    model = PumaForEmbedding.from_pretrained(checkpoint)
    assert (model.config.video_fps, model.config.video_min_frames, model.config.video_max_frames,
            model.config.video_total_pixels) == (1.0, 4, 64, 7_864_320)
    # the embedder's `max_frames` lowered to 8 (a constructor argument there, a config field here) so that a short
    # frame list is thinned: each of its frames is first resized as qwen-vl-utils 0.0.14 does
    model.config.video_max_frames = 8
    frame_list = [Image.fromarray(frame) for frame in moving_shape_frames(11, size=(40, 30), colour="green")]
    inputs = [{"video": clips[".mp4"]}, {"video": clips["circle"], "text": "a circle moving down"},
              {"video": frame_list}]
    for instruction in (None, "Find the clip that matches the text"):
        expected = qwen3_vl_embedding_video_reference(checkpoint, inputs, instruction, max_frames=8)
        got = model.encode(inputs, instruction=instruction, batch_size=3)
        assert_close(got, expected, ulps=FORWARD_ULPS)


def gme_video_reference(checkpoint, inputs, instruction=None):
    """GME's inference steps (Alibaba-NLP/gme-Qwen2-VL `gme_inference.py`: the hand-built prompt ending in
    `<|endoftext|>`, the text decoder on input embeddings with positions 0..L-1, the last attended token) with a
    video item in place of the image (GME publishes no video recipe; its `forward` leaves videos out): qwen-vl-utils'
    `fetch_video` at 2 fps, 4 to 16 frames, a budget of 1280 x 28^2 pixels, the Qwen2-VL processor without a second
    video resize."""
    from qwen_vl_utils import fetch_video

    processor = transformers.Qwen2VLProcessor.from_pretrained(checkpoint)
    model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).model.eval()
    instruction = "You are a helpful assistant." if instruction is None else instruction
    texts, videos, metadata = [], [], []
    for item in inputs:
        video, meta = fetch_video({"video": "file://" + item["video"], "fps": 2.0, "min_frames": 4, "max_frames": 16,
                                   "total_pixels": 1280 * 28 * 28}, image_patch_size=14, return_video_metadata=True)
        videos.append(video)
        metadata.append(meta)
        prompt = "<|vision_start|><|video_pad|><|vision_end|>" + (item.get("text") or "")
        texts.append(f"<|im_start|>system\n{instruction}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n"
                     "<|im_start|>assistant\n<|endoftext|>")
    batch = processor(text=texts, videos=videos, padding=True, padding_side="right", truncation=True,
                      max_length=1800, return_tensors="pt",
                      videos_kwargs={"video_metadata": metadata, "do_resize": False, "do_sample_frames": False})
    with torch.no_grad():
        embeds = model.get_input_embeddings()(batch["input_ids"])
        features = model.visual(batch["pixel_values_videos"], grid_thw=batch["video_grid_thw"])
        embeds[batch["input_ids"] == model.config.video_token_id] = getattr(features, "pooler_output", features)
        positions = torch.arange(batch["input_ids"].shape[1]).view(1, 1, -1).expand(3, len(texts), -1)
        hidden = model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                      position_ids=positions).last_hidden_state
    return F.normalize(_last_token(hidden, batch["attention_mask"]), p=2, dim=-1)


def test_gme_at_full_depth_is_its_documented_steps_on_video(embedder_checkpoints, clips, pyav_video_reader):
    checkpoint = embedder_checkpoints["gme"]
    model = PumaForEmbedding.from_pretrained(checkpoint)
    inputs = [{"video": clips[".mp4"]}, {"video": clips["circle"], "text": "a circle moving down"}]
    assert_close(model.encode(inputs), gme_video_reference(checkpoint, inputs), ulps=FORWARD_ULPS)
    instruction = "Find the clip that matches the text."
    assert_close(model.encode(inputs, instruction=instruction), gme_video_reference(checkpoint, inputs, instruction),
                 ulps=FORWARD_ULPS)
