"""The closest synthetic/training pairs side by side, as one PNG a reviewer can judge at a glance."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

FLAGGED_RGB = (220, 30, 30)
CLEAR_RGB = (40, 160, 70)


@dataclass(frozen=True)
class PairTile:
    synthetic: np.ndarray  # H x W x C uint8
    train: np.ndarray  # H x W x C uint8, already mirrored when the match was mirrored
    caption: str
    flagged: bool


def _to_rgb(image: np.ndarray, side: int) -> Image.Image:
    arr = image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image
    # nearest-neighbour upscaling keeps pixels honest: interpolation would blur away the evidence
    return Image.fromarray(np.ascontiguousarray(arr)).convert("RGB").resize((side, side), Image.NEAREST)


def render_pairs_png(tiles: list[PairTile], tile_px: int = 96, caption_px: int = 240) -> bytes:
    """One row per pair: synthetic | nearest training image | caption; a red frame marks a flagged pair."""
    pad, header = 6, 20
    width = pad + 2 * (tile_px + pad) + caption_px
    height = header + max(1, len(tiles)) * (tile_px + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 4), "synthetic", fill=(0, 0, 0))
    draw.text((2 * pad + tile_px, 4), "nearest real train", fill=(0, 0, 0))
    if not tiles:
        draw.text((pad, header + 4), "no synthetic images", fill=(0, 0, 0))
    for row, tile in enumerate(tiles):
        y = header + row * (tile_px + pad)
        colour = FLAGGED_RGB if tile.flagged else CLEAR_RGB
        for col, image in enumerate((tile.synthetic, tile.train)):
            x = pad + col * (tile_px + pad)
            canvas.paste(_to_rgb(image, tile_px), (x, y))
            draw.rectangle((x - 2, y - 2, x + tile_px + 1, y + tile_px + 1), outline=colour, width=2)
        text_x = pad + 2 * (tile_px + pad)
        for i, line in enumerate(tile.caption.splitlines()):
            draw.text((text_x, y + 2 + 12 * i), line, fill=colour if i == 0 else (0, 0, 0))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


__all__ = ["PairTile", "render_pairs_png"]
