#!/usr/bin/env python3
"""Reference logprobs and penalized greedy tokens for the tiny random Llama.

    HF_HUB_OFFLINE=1 $VENV/bin/python Tests/Fixtures/make_sampling_fixtures.py

Needs tiny/hf and tiny/reference.json (from make_fixtures.py) and the same
environment (torch cpu, transformers 5.23). Writes tiny/sampling_reference.json:

sequences[p]
    ids: prompt p of reference.json followed by its 16 greedy tokens (the "hf"
    greedy of reference.json, re-checked here), and log_softmax[pos][vocab]: the
    no-cache forward's log-softmax at every position (it scores ids[pos + 1]).
    The source of completions' prompt logprobs (echo) and generated tokens' logprobs.
penalties[i]
    params (OpenAI/vLLM names), prompt_ids (reference.json's prompts, then two of its
    greedy continuations as prompts: this random model seldom repeats a prompt's
    tokens otherwise, and then the prompt's part of repetition_penalty is untested),
    16 greedy tokens (EOS disabled) under those logit adjustments, each step's
    top1 - top2 margin after adjusting, and for repetition_penalty whether
    penalizing output tokens only would have given other tokens.
    Adjustments in vLLM's order: repetition_penalty over prompt + output tokens
    (logit > 0: divided, else multiplied), then logit -= frequency_penalty * count,
    then logit -= presence_penalty * (count > 0), over output tokens only, then
    logit_bias. The repetition-only case is also checked against transformers'
    generate(repetition_penalty=...).

With --smollm2 it also writes smollm2/logprobs.json: for each "raw" case of
smollm2/golden.json (prompt_ids + 40 greedy token_ids), the log-softmax of
SmolLM2-135M-Instruct Q4_1 (dequantized to f32 by transformers) at every position
of one no-cache forward over prompt + tokens, as the logprob of the next token
and the top 5 (ids, logprobs). Needs the GGUF in $SMOLLM2_DIR (default: models/).
"""
import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
import transformers
from transformers import LlamaForCausalLM

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()
HERE = Path(__file__).resolve().parent
TINY = HERE / "tiny"
N_NEW = 16

CASES = [
    {"repetition_penalty": 1.3},
    {"frequency_penalty": 0.9},
    {"presence_penalty": 1.5},
    {"repetition_penalty": 1.15, "frequency_penalty": 0.4, "presence_penalty": 0.6},
    {"logit_bias": {"7": 4.0, "97": -100.0, "201": 2.5}},
]


def adjusted_greedy(model, prompt, params, output_only=False):
    ids = list(prompt)
    counts = torch.zeros(model.config.vocab_size, dtype=torch.float32)
    out, margins = [], []
    for _ in range(N_NEW):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].clone()
        rp = params.get("repetition_penalty", 1.0)
        if rp != 1.0:
            seen = sorted(set(out) if output_only else set(prompt) | set(out))
            if seen:
                v = logits[seen]
                logits[seen] = torch.where(v > 0, v / rp, v * rp)
        logits = logits - params.get("frequency_penalty", 0.0) * counts
        logits = logits - params.get("presence_penalty", 0.0) * (counts > 0).float()
        for k, b in params.get("logit_bias", {}).items():
            logits[int(k)] += b
        top = torch.topk(logits, 2)
        t = int(top.indices[0])
        margins.append(float(top.values[0] - top.values[1]))
        out.append(t)
        counts[t] += 1
        ids.append(t)
    return out, margins


def smollm2():
    from transformers import AutoModelForCausalLM
    model_dir = Path(os.environ.get("SMOLLM2_DIR", HERE.parent.parent / "models"))
    model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32).eval()
    golden = json.loads((HERE / "smollm2" / "golden.json").read_text())
    cases = []
    for c in golden["raw"]:
        ids = c["prompt_ids"] + c["token_ids"]
        with torch.no_grad():
            lsm = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
        top = torch.topk(lsm, 5, dim=-1)
        nxt = [float(f"{lsm[i, ids[i + 1]]:.8g}") for i in range(len(ids) - 1)]
        cases.append({"prompt_text": c["prompt_text"], "prompt_ids": c["prompt_ids"], "token_ids": c["token_ids"],
                      "next_logprob": nxt, "top5_ids": top.indices.tolist(),
                      "top5_logprobs": [[float(f"{v:.8g}") for v in row] for row in top.values.tolist()]})
    out = {"description": "SmolLM2 Q4_1 (transformers, f32) log-softmax over golden.json's raw cases; see make_sampling_fixtures.py",
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__}, "cases": cases}
    path = HERE / "smollm2" / "logprobs.json"
    path.write_text(json.dumps(out, separators=(",", ":")) + "\n")
    print("wrote", path, path.stat().st_size, "bytes")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smollm2", action="store_true", help="also write smollm2/logprobs.json")
    args = ap.parse_args()
    if args.smollm2:
        smollm2()
    ref = json.loads((TINY / "reference.json").read_text())
    model = LlamaForCausalLM.from_pretrained(TINY / "hf", dtype=torch.float32).eval()
    gc = model.generation_config
    gc.eos_token_id = gc.bos_token_id = None
    gc.pad_token_id = 0

    sequences = []
    for p, prompt in enumerate(ref["prompts"]):
        greedy, _ = adjusted_greedy(model, prompt, {})
        assert greedy == ref["greedy"]["hf"][p], (p, greedy)
        ids = prompt + greedy
        with torch.no_grad():
            lsm = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
        sequences.append({"prompt_len": len(prompt), "ids": ids,
                          "log_softmax": [[float(f"{v:.8g}") for v in row] for row in lsm.tolist()]})

    penalties = []
    prompts = ref["prompts"] + [ref["greedy"]["hf"][0], ref["greedy"]["hf"][2]]
    for params in CASES:
        for p, prompt in enumerate(prompts):
            toks, margins = adjusted_greedy(model, prompt, params)
            base, _ = adjusted_greedy(model, prompt, {})
            if set(params) == {"repetition_penalty"}:
                with torch.no_grad():
                    g = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                       max_new_tokens=N_NEW, do_sample=False, repetition_penalty=params["repetition_penalty"])
                assert g[0, len(prompt):].tolist() == toks, ("transformers disagrees", params, p)
            entry = {"params": params, "prompt_ids": prompt, "tokens": toks, "margins": margins, "differs_from_greedy": toks != base}
            if "repetition_penalty" in params:
                entry["prompt_tokens_matter"] = adjusted_greedy(model, prompt, params, output_only=True)[0] != toks
            penalties.append(entry)
            print(params, p, "min margin %.4f" % min(margins), "differs" if toks != base else "same as greedy",
                  "prompt tokens matter" if entry.get("prompt_tokens_matter") else "")

    out = {"description": __doc__.strip().splitlines()[0],
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
           "sequences": sequences, "penalties": penalties}
    path = TINY / "sampling_reference.json"
    path.write_text(json.dumps(out, separators=(",", ":")) + "\n")
    print("wrote", path, path.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
