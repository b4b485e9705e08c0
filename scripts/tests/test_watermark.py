"""Print the invisible watermark decoded from an image: ``StableDiffusionV1`` for our outputs, "null" if none.

    python scripts/tests/test_watermark.py outputs/txt2img-samples/samples/00000.png
"""

import argparse
import sys

import cv2

from ldm.watermark import read_watermark


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Decode the invisible watermark of an image.")
    parser.add_argument("image", help="path of the image")
    args = parser.parse_args(argv)
    bgr = cv2.imread(args.image)
    if bgr is None:
        print(f"error: cannot read image {args.image}", file=sys.stderr)
        return 2
    payload = read_watermark(bgr)
    print(payload if payload is not None else "null")
    return 0


if __name__ == "__main__":
    sys.exit(main())
