"""Tiny videos and PDFs written offline for the video and document tests: frames of a moving drawn shape, encoded
with PyAV (FFmpeg in its wheel) into every container `encode` reads, and PDFs of drawn pages written by Pillow.

Lossless codecs where pixels are compared: libx264rgb at crf 0 (.mp4, .mov), FFV1 (.mkv), raw BGR (.avi) and VP9
lossless in planar RGB (.webm); GIF stores a 256-colour palette."""

import numpy as np
from PIL import Image, ImageDraw


# container suffix -> (codec, pixel format, codec options)
CODECS = {".mp4": ("libx264rgb", "rgb24", {"crf": "0"}), ".mov": ("libx264rgb", "rgb24", {"crf": "0"}),
          ".mkv": ("ffv1", "bgr0", {}), ".avi": ("rawvideo", "bgr24", {}),
          ".webm": ("libvpx-vp9", "gbrp", {"lossless": "1"}), ".gif": ("gif", "rgb8", {})}
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 70, 220), "yellow": (240, 200, 20)}


def moving_shape_frames(count: int = 12, size: tuple[int, int] = (64, 48), shape: str = "square",
                        colour: str = "red", direction: tuple[int, int] = (1, 0),
                        background=(250, 250, 250)) -> list[np.ndarray]:
    """`count` RGB frames `(height, width, 3)` of a `shape` ("square", "circle" or "triangle") of `colour` moving
    across the frame in `direction` (steps of x and y per frame, in units of a twelfth of the frame)."""
    width, height = size
    radius = max(3, min(width, height) // 6)
    frames = []
    for i in range(count):
        image = Image.new("RGB", size, background)
        draw = ImageDraw.Draw(image)
        cx = (width // 2 + direction[0] * (i - count // 2) * width // 12) % width
        cy = (height // 2 + direction[1] * (i - count // 2) * height // 12) % height
        box = [cx - radius, cy - radius, cx + radius, cy + radius]
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "triangle":
            draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
        else:
            draw.rectangle(box, fill=fill)
        frames.append(np.asarray(image))
    return frames


def write_video(path, frames: list[np.ndarray], fps: int = 10) -> str:
    """Encodes `frames` (RGB `(height, width, 3)` uint8) at `fps` into `path`, with the codec of its suffix
    (`CODECS`); returns `path` as a string."""
    import av

    path = str(path)
    suffix = path[path.rfind("."):].lower()
    codec, pixel_format, options = CODECS[suffix]
    height, width = frames[0].shape[:2]
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, pixel_format
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def decode_all(path) -> list[np.ndarray]:
    """Every frame of a video file, RGB, in presentation order (PyAV)."""
    import av

    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def draw_page(number: int, size: tuple[int, int] = (200, 260)) -> Image.Image:
    """A drawn document page: a title bar, lines of 'text' and a shape whose place depends on `number`."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([10, 10, size[0] - 10, 30], fill=(30, 30, 120))
    for line in range(5):
        draw.line([15, 45 + 14 * line, size[0] - 15 - 9 * ((number + line) % 5), 45 + 14 * line], fill=(60, 60, 60),
                  width=3)
    x = 20 + (number * 37) % (size[0] - 60)
    draw.ellipse([x, 150, x + 40, 190], fill=tuple(COLOURS.values())[number % len(COLOURS)])
    draw.text((15, size[1] - 30), f"page {number}", fill="black")
    return image


def write_pdf(path, pages: list[Image.Image], resolution: float = 72.0) -> str:
    """A PDF of `pages` (a page of w x h pixels is w x h points at 72 dpi); returns `path` as a string."""
    path = str(path)
    pages[0].save(path, save_all=True, append_images=pages[1:], resolution=resolution)
    return path
