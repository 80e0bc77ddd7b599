"""Distribution shifts made from ordinary cell images, for measuring the familiarity check and the refer rule.

Each shift takes a full-size RGB image (PIL) and returns one: what another laboratory's microscope, stain or
camera might produce (:data:`CELL_SHIFTS`), or images that are no blood cells at all (:data:`NON_CELLS`,
made from a seed alone). ``benchmarks/shifts.py`` measures every model on them; ``write_shifted`` makes a
shifted copy of a folder of labelled images (e.g. to try ``bloodcell validate`` on it).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from bloodcell.arrays import open_image

HUE_STEPS = 40  # of PIL's 256 hue steps: about 56 degrees
STAIN_ROTATION_DEGREES = 30.0
JPEG_QUALITY = 10
BLUR_RADIUS = 2
# Ruifrok & Johnston's stain vectors (haematoxylin, eosin, DAB) in optical density, as scikit-image's rgb2hed.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
NON_CELL_SIZE = (360, 363)


def hue(image: Image.Image) -> Image.Image:
    """Every pixel's hue turned by :data:`HUE_STEPS` of 256 (a different stain colour, same brightness)."""
    h, s, v = image.convert("HSV").split()
    h = h.point(lambda x: (x + HUE_STEPS) % 256)
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def _rotation_about_grey(degrees: float) -> np.ndarray:
    """The 3x3 rotation by ``degrees`` about the grey axis (1, 1, 1) (Rodrigues' formula)."""
    axis = np.ones(3) / np.sqrt(3)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    angle = np.deg2rad(degrees)
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def stain(image: Image.Image) -> Image.Image:
    """Another stain: the image separated into haematoxylin, eosin and DAB amounts (HED, optical density) and
    put back together with each stain's colour turned :data:`STAIN_ROTATION_DEGREES` about the grey axis."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    density = -np.log(np.maximum(rgb, 1.0) / 255.0)
    amounts = density @ np.linalg.inv(RGB_FROM_HED)
    rotated = RGB_FROM_HED @ _rotation_about_grey(STAIN_ROTATION_DEGREES).T
    out = 255.0 * np.exp(-(amounts @ rotated))
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))


def zoom(image: Image.Image) -> Image.Image:
    """A 2x magnification: the centre half of the image enlarged back to its size (the cell fills the frame)."""
    w, h = image.size
    return image.crop((w // 4, h // 4, w // 4 + w // 2, h // 4 + h // 2)).resize((w, h), Image.Resampling.BICUBIC)


def blur(image: Image.Image) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(BLUR_RADIUS))


def grayscale(image: Image.Image) -> Image.Image:
    return image.convert("L").convert("RGB")


def jpeg(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    buffer.seek(0)
    with open_image(buffer) as compressed:
        return compressed.convert("RGB")


CELL_SHIFTS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "hue": hue,
    "stain": stain,
    "zoom": zoom,
    "blur": blur,
    "grayscale": grayscale,
    "jpeg": jpeg,
}


def noise(rng: np.random.Generator) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (NON_CELL_SIZE[1], NON_CELL_SIZE[0], 3), dtype=np.uint8))


def flat(rng: np.random.Generator) -> Image.Image:
    return Image.new("RGB", NON_CELL_SIZE, tuple(int(c) for c in rng.integers(0, 256, 3)))


def checkerboard(rng: np.random.Generator) -> Image.Image:
    side = int(rng.integers(8, 61))
    rows, columns = np.indices((NON_CELL_SIZE[1], NON_CELL_SIZE[0])) // side
    colours = rng.integers(0, 256, (2, 3))
    return Image.fromarray(colours[(rows + columns) % 2].astype(np.uint8))


def scene(rng: np.random.Generator) -> Image.Image:
    """A child's drawing: sky, ground, sun, a house with a roof and door, a tree; placed at random."""
    w, h = NON_CELL_SIZE
    image = Image.new("RGB", NON_CELL_SIZE, (int(rng.integers(90, 170)), int(rng.integers(150, 220)), 250))
    draw = ImageDraw.Draw(image)
    horizon = int(rng.integers(h // 2, 3 * h // 4))
    draw.rectangle((0, horizon, w, h), fill=(40, int(rng.integers(120, 200)), 40))
    sun = (int(rng.integers(20, w - 60)), int(rng.integers(10, horizon // 2)))
    draw.ellipse((*sun, sun[0] + 50, sun[1] + 50), fill=(255, 220, 0))
    left = int(rng.integers(10, w // 2))
    top = horizon - int(rng.integers(60, 110))
    draw.rectangle((left, top, left + 110, horizon), fill=tuple(int(c) for c in rng.integers(80, 256, 3)))
    draw.polygon([(left - 10, top), (left + 55, top - 50), (left + 120, top)], fill=(150, 30, 30))
    draw.rectangle((left + 45, horizon - 45, left + 70, horizon), fill=(90, 50, 20))
    trunk = int(rng.integers(w // 2 + 40, w - 30))
    draw.rectangle((trunk, horizon - 70, trunk + 12, horizon), fill=(100, 60, 20))
    draw.ellipse((trunk - 30, horizon - 120, trunk + 42, horizon - 55), fill=(20, 110, 20))
    return image


NON_CELLS: dict[str, Callable[[np.random.Generator], Image.Image]] = {
    "noise": noise,
    "flat": flat,
    "checkerboard": checkerboard,
    "scene": scene,
}


def non_cell_images(kind: str, count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [NON_CELLS[kind](rng) for _ in range(count)]


def write_shifted(source: Path, target: Path, shift: str) -> int:
    """A copy of the labelled folder ``source`` (``<class>/<image>``) under ``target`` with ``shift`` applied
    to every image (written as PNG, so no compression is added but the shift's own); the images written."""
    if shift not in CELL_SHIFTS:
        raise ValueError(f"unknown shift {shift!r}; one of {', '.join(CELL_SHIFTS)}")
    written = 0
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        try:
            with open_image(path) as image:
                shifted = CELL_SHIFTS[shift](image.convert("RGB"))
        except OSError:
            continue  # not an image: left out, as predict would list it
        out = target / path.relative_to(source).with_suffix(".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        shifted.save(out)
        written += 1
    return written
