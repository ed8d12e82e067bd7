#!/usr/bin/env python3
"""Fine-tune a LoRA adapter for SmolLM2-135M-Instruct on the CPU with PEFT, then pack it.

Usage (from the repository root; $VENV is a virtualenv with torch (cpu),
transformers, peft, safetensors and gguf, as in shared REFERENCE-NOTES):
    HF_HUB_OFFLINE=1 TQDM_DISABLE=1 nice -n 10 $VENV/bin/python ops/train-adapter.py \\
        --data adapters/datasets/sql/train.jsonl --out /tmp/peft-sql --name sql \\
        [--rank 8] [--alpha 16] [--targets q_proj,v_proj|all] [--steps 150] [--lr 1e-3] \\
        [--batch 8] [--seed 0] [--max-len 96] [--threads 2] \\
        [--model models/SmolLM2-135M-Instruct.Q4_1.gguf] [--no-pack]

--data   JSONL of {"prompt": ..., "response": ...}. Each row is rendered with the model's
         ChatML chat template (user turn = prompt, default system message, generation prompt)
         followed by the response and <|im_end|>; the loss covers the response tokens and
         <|im_end|> only.
--out    PEFT output directory (keep it OUTSIDE adapters/: the server registers any
         directory with an adapter_config.json found there).
--name   If given (and not --no-pack), runs `.build/release/adapterctl pack OUT -o adapters/NAME.lora`
         (f16).

The base weights are the GGUF dequantized to f32 by transformers and moved into a plain
LlamaForCausalLM (as Tests/Fixtures/make_fixtures.py does). The adapter is saved with
safetensors, save_embedding_layers=False, task_type CAUSAL_LM and
base_model_name_or_path "HuggingFaceTB/SmolLM2-135M-Instruct".
"""
import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent
BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_dense(gguf_path: Path):
    gm = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    cd = gm.config.to_dict()
    cd.pop("quantization_config", None)
    cfg = LlamaConfig(**cd)
    m = LlamaForCausalLM(cfg).float()
    m.load_state_dict({k: v.detach().clone() for k, v in gm.state_dict().items()}, strict=True)
    del gm
    return m


def encode(tok, row, max_len, im_end):
    p = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True,
                                tokenize=False)
    pids = tok(p, add_special_tokens=False)["input_ids"]
    rids = tok(row["response"], add_special_tokens=False)["input_ids"] + [im_end]
    ids = (pids + rids)[:max_len]
    labels = ([-100] * len(pids) + rids)[:max_len]
    return ids, labels


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--name")
    ap.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=None, help="default 2*rank")
    ap.add_argument("--targets", default="q_proj,v_proj", help="comma list, or 'all' for the 7 projections")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-len", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-pack", action="store_true")
    a = ap.parse_args()

    from peft import LoraConfig, get_peft_model
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    t0 = time.time()
    gpath = Path(a.model).resolve()
    tok = AutoTokenizer.from_pretrained(gpath.parent, gguf_file=gpath.name)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    rows = [json.loads(l) for l in open(a.data) if l.strip()]
    data = [encode(tok, r, a.max_len, im_end) for r in rows]
    print(f"{len(data)} examples, max tokens {max(len(d[0]) for d in data)}, "
          f"truncated {sum(len(d[0]) == a.max_len for d in data)}", flush=True)

    model = load_dense(gpath)
    targets = ALL7 if a.targets == "all" else sorted(t.strip() for t in a.targets.split(",") if t.strip())
    cfg = LoraConfig(r=a.rank, lora_alpha=a.alpha if a.alpha is not None else 2 * a.rank,
                     target_modules=targets, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    model.print_trainable_parameters()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    warm = max(1, a.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * max(0.0, (a.steps - s) / max(1, a.steps - warm)) if s >= warm
        else (s + 1) / warm)
    pad = tok.pad_token_id if tok.pad_token_id is not None else im_end
    print(f"load {time.time() - t0:.1f}s", flush=True)
    t1 = time.time()
    model.train()
    order = []
    for step in range(a.steps):
        if len(order) < a.batch:
            idx = list(range(len(data))); rng.shuffle(idx); order += idx
        batch = [data[i] for i in order[:a.batch]]; del order[:a.batch]
        L = max(len(b[0]) for b in batch)
        ids = torch.tensor([b[0] + [pad] * (L - len(b[0])) for b in batch])
        lab = torch.tensor([b[1] + [-100] * (L - len(b[1])) for b in batch])
        att = torch.tensor([[1] * len(b[0]) + [0] * (L - len(b[0])) for b in batch])
        loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(); sched.step(); opt.zero_grad()
        if step % 10 == 0 or step == a.steps - 1:
            print(f"step {step + 1}/{a.steps} loss {loss.item():.4f} ({time.time() - t1:.0f}s)", flush=True)
    train_s = time.time() - t1

    out = Path(a.out)
    model.peft_config["default"].base_model_name_or_path = BASE_ID
    model.save_pretrained(out, safe_serialization=True, save_embedding_layers=False)
    c = json.loads((out / "adapter_config.json").read_text())
    c["base_model_name_or_path"] = BASE_ID
    (out / "adapter_config.json").write_text(json.dumps(c, indent=2, sort_keys=True))
    print(f"saved {out}; training {train_s:.0f}s, total {time.time() - t0:.0f}s", flush=True)
    if a.name and not a.no_pack:
        dst = ROOT / "adapters" / f"{a.name}.lora"
        subprocess.run([str(ROOT / ".build" / "release" / "adapterctl"), "pack", str(out), "-o", str(dst),
                        "--dtype", "f16"], check=True)
        print(f"packed {dst} ({dst.stat().st_size} bytes)", flush=True)


if __name__ == "__main__":
    main()
