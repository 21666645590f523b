"""Emoji pictures drawn with Pillow from Noto Color Emoji (Debian `fonts-noto-color-emoji`): one glyph, centred
on a white square, resized."""

import os
import warnings

import PIL
from PIL import Image, ImageDraw, ImageFont, features

from vlmerge.core.errors import ConfigError

FONT_SIZE = 109  # Noto Color Emoji is a bitmap font whose only strike is 109 px
MARGIN = 8  # px of transparent border around a drawn glyph, so nothing is clipped


def load_font(path: str | os.PathLike) -> ImageFont.FreeTypeFont:
    """The emoji font at its one bitmap size; warns when Pillow cannot shape sequences."""
    if not features.check("raqm"):
        warnings.warn(
            "Pillow has no libraqm: emoji sequences (ZWJ, flags, skin tones) are drawn as several "
            "glyphs and will be skipped; install libraqm (and libfribidi) to keep them",
            stacklevel=2,
        )
    try:
        return ImageFont.truetype(str(path), FONT_SIZE)
    except OSError as error:
        raise ConfigError(f"{path}: cannot load as a {FONT_SIZE} px font ({error})") from error


def render_emoji(font: ImageFont.FreeTypeFont, emoji: str, image_size: int) -> Image.Image | None:
    """The emoji alone, centred on white, image_size square (RGB); None when the font cannot draw it as one picture."""
    if font.getlength(emoji) > 1.5 * font.getlength(emoji[0]):
        return None  # not shaped into one glyph: its parts would be drawn side by side
    glyph = _draw_glyph(font, emoji)
    box = glyph.getbbox()  # bounds of the non-transparent pixels
    if box is None:
        return None  # blank: the font has nothing for it
    return _square_on_white(glyph.crop(box)).resize((image_size, image_size), Image.Resampling.LANCZOS)


def _draw_glyph(font: ImageFont.FreeTypeFont, emoji: str) -> Image.Image:
    left, top, right, bottom = font.getbbox(emoji)
    canvas = Image.new("RGBA", (right - left + 2 * MARGIN, bottom - top + 2 * MARGIN), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((MARGIN - left, MARGIN - top), emoji, font=font, embedded_color=True)
    return canvas


def _square_on_white(glyph: Image.Image) -> Image.Image:
    """Pad to a square so resizing keeps the aspect ratio (flags are wider than tall)."""
    side = max(glyph.size)
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    square.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    return square.convert("RGB")


def renderer() -> str:
    """Pillow's version and layout engine decide which sequences render, so they key the cache too."""
    return f"pillow-{PIL.__version__}-{'raqm' if features.check('raqm') else 'basic'}"
