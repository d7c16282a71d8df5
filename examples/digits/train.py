"""Train a logistic-regression digit classifier with SGD on data/; write model/model.pkl + metrics.json."""

from __future__ import annotations

import argparse
import json
import pickle
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import SGDClassifier
from sklearn.metrics import log_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lr", type=float, default=0.01, help="learning rate")
    parser.add_argument(
        "--max-iter", "--max_iter", "--epochs", dest="max_iter", type=int, default=30, help="epochs"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=Path("data"))
    parser.add_argument("--out", type=Path, default=Path("model"))
    args = parser.parse_args()
    if args.lr <= 0 or args.max_iter < 1:
        parser.error("--lr must be > 0 and --max-iter >= 1")

    train = np.load(args.data / "train.npz")
    x, y = train["x"], train["y"]
    classes = np.unique(y)
    model = SGDClassifier(
        loss="log_loss", learning_rate="constant", eta0=args.lr, alpha=1e-4, random_state=args.seed
    )
    rng = np.random.default_rng(args.seed)
    started = time.monotonic()
    loss = accuracy = 0.0
    for epoch in range(1, args.max_iter + 1):
        order = rng.permutation(len(y))
        model.partial_fit(x[order], y[order], classes=classes)
        loss = float(log_loss(y, model.predict_proba(x), labels=classes))
        accuracy = float((model.predict(x) == y).mean())
        print(f"epoch {epoch}/{args.max_iter} loss={loss:.4f} train_accuracy={accuracy:.4f}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "model.pkl", "wb") as f:
        pickle.dump(model, f)
    metrics = {
        "lr": args.lr,
        "epochs": args.max_iter,
        "train_loss": loss,
        "train_accuracy": accuracy,
        "seconds": round(time.monotonic() - started, 3),
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"saved {args.out}/model.pkl (train accuracy {accuracy:.4f})")


if __name__ == "__main__":
    main()
