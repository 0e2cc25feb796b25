"""FAM explanation time over a plain forward pass: ResNet18 at 224x224, batch 1 and 32.

Run: .venv/bin/python bench/bench_fam.py [--repeats N]
Target: <= 1.05. The map is one weighted sum; the forward pass is the floor.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import explain_over_forward  # noqa: E402

from fam_core import FAM  # noqa: E402
from fam_core.models.backbones import resnet18  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    args = parser.parse_args()
    torch.manual_seed(0)
    model = resnet18().eval()
    explainer = FAM(model, target_layer="layer4")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| batch | forward (ms) | FAM (ms) | FAM / forward |")
    print("|---:|---:|---:|---:|")
    for batch in args.batches:
        value, fam_seconds, forward_seconds = explain_over_forward(
            model, explainer, batch, args.repeats
        )
        print(
            f"| {batch} | {1000 * forward_seconds:.1f} | {1000 * fam_seconds:.1f} | {value:.3f} |"
        )


if __name__ == "__main__":
    main()
