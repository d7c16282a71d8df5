"""Split scikit-learn's bundled digits data set (no download) into train and test sets under data/."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--test-size", "--test_size", dest="test_size", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("data"))
    args = parser.parse_args()

    digits = load_digits()
    x = digits.data.astype(np.float32) / 16.0  # pixels are 0..16
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=args.test_size, random_state=args.seed, stratify=digits.target
    )
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / "train.npz", x=x_train, y=y_train)
    np.savez_compressed(args.out / "test.npz", x=x_test, y=y_test)
    print(f"train: {len(y_train)} images, test: {len(y_test)} images -> {args.out}/")


if __name__ == "__main__":
    main()
