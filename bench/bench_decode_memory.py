"""Peak memory of one request through the in-process pipeline, for a one-colour PNG.

Run: .venv/bin/python bench/bench_decode_memory.py [--height 1] [--width 10000]
Prints whether the request was answered or refused and the growth of the process's peak
RSS (``VmHWM``, reset through ``/proc/self/clear_refs``; Linux only) during that request.
"""

from __future__ import annotations

import argparse
import io
import re

import numpy as np
from PIL import Image

from fam_core.pipeline import EncodedImage, ExplainRequest, ModelRegistry, Pipeline


def peak_mib() -> int:
    status = open("/proc/self/status").read()  # noqa: SIM115
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) // 1024  # type: ignore[union-attr]


def png(height: int, width: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 200, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--height", type=int, default=1)
    parser.add_argument("--width", type=int, default=10_000)
    parser.add_argument("--model", default="default-classifier")
    args = parser.parse_args()
    pipeline = Pipeline(ModelRegistry.from_names([args.model]), batching=None)
    pipeline.explain(ExplainRequest(args.model, (EncodedImage(png(84, 84)),)))  # warm up
    image = png(args.height, args.width)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    before = peak_mib()
    try:
        pipeline.explain(ExplainRequest(args.model, (EncodedImage(image),)))
        outcome = "answered"
    except Exception as error:  # noqa: BLE001 - the outcome is what is measured
        outcome = f"refused: {str(error).splitlines()[0]}"
    print(f"{args.height}x{args.width} PNG ({len(image)} bytes): {outcome}")
    print(f"peak RSS growth: +{peak_mib() - before} MiB")


if __name__ == "__main__":
    main()
