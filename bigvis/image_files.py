"""Image files in a folder, as `bigvis zeroshot` and `bigvis translatability` read them: which names
count as images, and their pixels as 8-bit RGB."""
from __future__ import annotations

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")


def is_image_name(name: str) -> bool:
  """Whether a file name is one of IMAGE_SUFFIXES and not hidden: the one rule both commands use."""
  return name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith(".")


def load_rgb(path: str) -> np.ndarray | None:
  """uint8 [H, W, 3] RGB pixels, or None when the file is not a readable image.

  16-bit greyscale (PIL's I;16 and I modes) is scaled to 8 bits (divided by 257, rounded), as the eval
  pipeline's decode scales it: convert("RGB") would clip every value above 255 to white.
  """
  from PIL import Image

  try:
    with Image.open(path) as im:
      if im.mode.startswith("I"):
        grey = np.round(np.clip(np.asarray(im, dtype=np.float64), 0, 65535) / 257.0).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
      return np.asarray(im.convert("RGB"), dtype=np.uint8)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
    return None
