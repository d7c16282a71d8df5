"""Evaluate model/model.pkl on data/test.npz; write eval/report.json and print the accuracy."""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("data"))
    parser.add_argument("--model", type=Path, default=Path("model"))
    parser.add_argument("--out", type=Path, default=Path("eval"))
    args = parser.parse_args()

    test = np.load(args.data / "test.npz")
    with open(args.model / "model.pkl", "rb") as f:
        model = pickle.load(f)
    predicted = model.predict(test["x"])
    accuracy = float(accuracy_score(test["y"], predicted))
    report = {
        "accuracy": accuracy,
        "macro_f1": float(f1_score(test["y"], predicted, average="macro")),
        "test_images": len(test["y"]),
        "confusion_matrix": confusion_matrix(test["y"], predicted).tolist(),
        "train_metrics": json.loads((args.model / "metrics.json").read_text()),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"accuracy: {accuracy:.4f} on {len(test['y'])} test images -> {args.out}/report.json")


if __name__ == "__main__":
    main()
