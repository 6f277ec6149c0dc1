"""Contact sheet of the synthetic demo set: one row per expression, one column per subject.

    python benchmarks/demo_data_preview.py sheet.png [--data DIR] [--subjects 5]

Without --data it generates a set into a temporary folder first. For looking
at, not for tests: the question it answers is "do these still look like faces,
and can one tell the expressions apart?".
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import cv2
import numpy as np

from ferpipe.demo.synthetic import EXPRESSION_CODES, make_demo_dataset


def contact_sheet(data: Path, subjects: int, tile: int = 160) -> np.ndarray:
    names = sorted(p.name for p in data.glob("*.tiff"))
    codes = sorted({n[:2] for n in names})[:subjects]
    label_w = 90
    sheet = np.full((tile * len(EXPRESSION_CODES), label_w + tile * len(codes)), 255, np.uint8)
    for row, (code, label) in enumerate(EXPRESSION_CODES.items()):
        cv2.putText(sheet, label, (4, row * tile + tile // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.5, 0, 1, cv2.LINE_AA)
        for col, subject in enumerate(codes):
            # First repetition of this subject and expression.
            name = next(n for n in names if n.startswith(f"{subject}.{code}1."))
            img = cv2.imread(str(data / name), cv2.IMREAD_GRAYSCALE)
            sheet[row * tile:(row + 1) * tile, label_w + col * tile:label_w + (col + 1) * tile] = cv2.resize(
                img, (tile, tile), interpolation=cv2.INTER_AREA)
    return sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="PNG to write")
    parser.add_argument("--data", type=Path, help="an existing demo set (default: generate one)")
    parser.add_argument("--subjects", type=int, default=5)
    parser.add_argument("--tile", type=int, default=160)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or make_demo_dataset(tmp, subjects=args.subjects, per_expression=1)
        cv2.imwrite(str(args.out), contact_sheet(data, args.subjects, args.tile))
    print(args.out)


if __name__ == "__main__":
    main()
