"""What every dataset generator here shares: its command line and the JSONL split it writes."""
import argparse
import json
import random
from pathlib import Path


def setup(name):
    """Parses --out/--train/--heldout/--seed; returns (args, seeded rng, output dir)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).parent / name))
    ap.add_argument("--train", type=int, default=600)
    ap.add_argument("--heldout", type=int, default=60)
    ap.add_argument("--seed", type=int, default=6)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    return a, random.Random(a.seed), out


def write_split(out, train, held):
    """Writes train.jsonl and heldout.jsonl, one {"prompt","response"} object per line."""
    for fn, rows in (("train.jsonl", train), ("heldout.jsonl", held)):
        with open(out / fn, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print(f"wrote {len(train)} train / {len(held)} held-out to {out}")
