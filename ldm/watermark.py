"""The invisible watermark of Stable Diffusion's outputs: dwtDct, payload "StableDiffusionV1", as the original."""

import logging

import cv2
import numpy as np
from imwatermark import WatermarkDecoder, WatermarkEncoder
from PIL import Image

logger = logging.getLogger(__name__)

PAYLOAD = "StableDiffusionV1"
METHOD = "dwtDct"
MIN_PIXELS = 256 * 256  # smaller images are refused by the dwtDct encoder


def can_watermark(image: Image.Image) -> bool:
    return image.width * image.height >= MIN_PIXELS


def put_watermark(image: Image.Image) -> Image.Image:
    """Embed the payload as the original does: RGB → BGR for OpenCV, encode, back to RGB."""
    encoder = WatermarkEncoder()
    encoder.set_watermark("bytes", PAYLOAD.encode("utf-8"))
    bgr = cv2.cvtColor(np.array(image.convert("RGB")), cv2.COLOR_RGB2BGR)
    return Image.fromarray(encoder.encode(bgr, METHOD)[:, :, ::-1])


def read_watermark(bgr: np.ndarray) -> str | None:
    """The payload decoded from a BGR image (as ``cv2.imread`` gives), or None if it is not valid UTF-8."""
    decoder = WatermarkDecoder("bytes", 8 * len(PAYLOAD))
    try:
        return decoder.decode(bgr, METHOD).decode("utf-8")
    except UnicodeDecodeError:
        return None
