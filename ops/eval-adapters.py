#!/usr/bin/env python3
"""Held-out task accuracy of sample adapters, measured through a live LoraMux server.

Usage (from the repository root, with a server running, e.g.
`.build/release/loramux serve --model models/SmolLM2-135M-Instruct.Q4_1.gguf --adapters adapters --port 8099`):

    python3 ops/eval-adapters.py --server http://127.0.0.1:8099 [--adapters json-extract sql] \\
        [--limit N] [--base-model SmolLM2-135M-Instruct.Q4_1] [--max-tokens 96] [--concurrency 8] [--show 0]

For every adapter NAME the held-out set is adapters/datasets/NAME/heldout.jsonl and the task
comes from adapters/datasets/NAME/train_config.json ("task": json-extract | sql | voice,
voice also has "marker"). Each held-out prompt is sent as one user message to
/v1/chat/completions with temperature 0 and max_tokens 96, once with model = the base id and
once with model = NAME. Scoring (identical for base and adapter):
  json-extract  the text from the first '{' to the last '}' parses as JSON and equals the expected dict
  sql           normalized string equality: ``` fences removed, lowercase, whitespace collapsed,
                trailing ';' stripped
  voice         the marker string occurs in the reply (case-insensitive)
Prints a markdown table: adapter | task | base accuracy | adapter accuracy | n.
Stdlib only (urllib); requests go to the server concurrently so it can batch them.
"""
import argparse
import json
import re
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATASETS = ROOT / "adapters" / "datasets"


def chat(server, model, prompt, max_tokens):
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}],
                       "temperature": 0, "max_tokens": max_tokens}).encode()
    req = urllib.request.Request(server.rstrip("/") + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())["choices"][0]["message"]["content"] or ""


def norm_sql(s):
    s = re.sub(r"```(sql)?", "", s, flags=re.I).strip().lower()
    s = re.sub(r"\s+", " ", s).strip()
    return s.rstrip(";").strip()


def score(task, cfg, reply, expected):
    if task == "json-extract":
        i, j = reply.find("{"), reply.rfind("}")
        if i < 0 or j < i:
            return False
        try:
            return json.loads(reply[i:j + 1]) == json.loads(expected)
        except ValueError:
            return False
    if task == "sql":
        return norm_sql(reply) == norm_sql(expected)
    if task == "voice":
        return cfg["marker"].lower() in reply.lower()
    raise ValueError(task)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default="http://127.0.0.1:8080")
    ap.add_argument("--adapters", nargs="+", default=None,
                    help="adapter names (default: every adapters/datasets/*/train_config.json)")
    ap.add_argument("--limit", type=int, default=None, help="first N held-out examples per adapter")
    ap.add_argument("--base-model", default="SmolLM2-135M-Instruct.Q4_1")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--show", type=int, default=0, help="print the first N replies per adapter")
    a = ap.parse_args()
    names = a.adapters or sorted(p.parent.name for p in DATASETS.glob("*/train_config.json"))
    rows = []
    with ThreadPoolExecutor(a.concurrency) as pool:
        for name in names:
            cfg = json.loads((DATASETS / name / "train_config.json").read_text())
            task = cfg["task"]
            held = [json.loads(l) for l in open(DATASETS / name / "heldout.jsonl") if l.strip()]
            if a.limit:
                held = held[:a.limit]
            acc = {}
            for model in (a.base_model, name):
                replies = list(pool.map(lambda ex: chat(a.server, model, ex["prompt"], a.max_tokens), held))
                ok = [score(task, cfg, r, ex["response"]) for r, ex in zip(replies, held)]
                acc[model] = sum(ok) / len(ok)
                for r, ex, k in list(zip(replies, held, ok))[:a.show]:
                    print(f"[{name} / {model}] {'OK ' if k else 'BAD'} {r!r}  (expected {ex['response']!r})",
                          file=sys.stderr)
            rows.append((name, task, acc[a.base_model], acc[name], len(held)))
    print("| adapter | task | base accuracy | adapter accuracy | n |")
    print("|---|---|---|---|---|")
    for name, task, b, ad, n in rows:
        print(f"| {name} | {task} | {b:.0%} | {ad:.0%} | {n} |")


if __name__ == "__main__":
    main()
