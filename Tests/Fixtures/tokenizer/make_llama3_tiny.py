"""Makes the Llama-3-style tiny tokenizer fixture in llama3-tiny/.

A small byte-level BPE trained here with Hugging Face `tokenizers`, configured
like meta-llama/Meta-Llama-3-8B-Instruct's tokenizer.json: Split(Llama 3
regex, Isolated) + ByteLevel(use_regex=False) pre-tokenizer, ignore_merges,
TemplateProcessing post-processor adding <|begin_of_text|>, Llama 3 special
tokens, plus one non-special added token ("wizardry") and one vocabulary
word without a merge path (" zyzzyva", reachable only through ignore_merges).

Writes llama3-tiny/tokenizer.json, llama3-tiny/tokenizer_config.json,
llama3-tiny/corpus.json (text, ids without / with special tokens, decode) and
llama3-tiny/tokenizer.gguf: the same vocabulary as GGUF metadata only (no
tensors) the way llama.cpp's converter writes it (tokenizer.ggml.pre =
"llama-bpe", no add_bos_token key: llama.cpp's default for it adds BOS).

    $VENV/bin/python Tests/Fixtures/tokenizer/make_llama3_tiny.py
    ($VENV: a virtualenv with torch (cpu), transformers, peft, safetensors, gguf; see shared REFERENCE-NOTES)
"""
import json
import random
from pathlib import Path

import gguf
import tokenizers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

OUT = Path(__file__).resolve().parent / "llama3-tiny"
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
            "<|reserved_special_token_1|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|reserved_special_token_2|>", "<|reserved_special_token_3|>", "<|eot_id|>"]

TRAIN = [
    "The quick brown fox jumps over the lazy dog. I'm sure you're right; we've seen it, they'll agree.",
    "In 2024 there were 1234567 tokens, 42 models and 3.14159 reasons to count to 1000.",
    "def tokenize(text):\n    return [t for t in text.split()]  # simple\n\nclass Foo:\n\tpass\n",
    "Hello world! Hello again, world. HELLO WORLD? hello, hello.\r\nNew line\n\n\nParagraph.",
    "Ünïcödé café naïve résumé — “quotes” and ‘quotes’ … 日本語 中文 한국어 Русский Ελληνικά.",
    "Emoji 😀🎉👍 are bytes too. The end of the text is near; the beginning was long ago.",
] * 20

CORPUS = [
    "", " ", "Hello world", "Hello, world!", "  leading and trailing  ", "tabs\tand\ttabs\t\t",
    "I'm you're we've they'll he'd it's", "I'M YOU'RE WE'VE THEY'LL HE'D IT'S", "'s 'S 'ſ x'sy !'s ''s",
    "1 12 123 1234 12345 1234567", "3.14159 and 2,718", "٣٤٥٦ ²³ ⅔", "a1b22c333d4444",
    "line1\nline2\r\nline3\rline4\n\n\nline5", "  \n\n  indented\n\t\ttab", "\n", "\n\n\n", " \n \n ",
    "end.\n\n", "(hello) [world] {foo} \"bar\"", "...hello", "?!\n\nNext", "x  \n  y", "a\u00a0b\u3000c\u0085d",
    "def f(x):\n    return x ** 2  # square\n", "café naïve résumé", "e\u0301 a\u0308",
    "日本語のテキスト 中文 한국어", "😀🎉👍🏽 👨‍👩‍👧", "Emoji 😀 split",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
    "text<|end_of_text|>more", "<|reserved_special_token_1|><|reserved_special_token_0|>", "<|eot_id",
    "<|start_header_id|>assistant<|end_header_id|>\n\n", "a wizardry wizardrys unwizardry", "zyzzyva zyzzyva",
    " zyzzyvas", "The quick brown fox jumps over the lazy dog.",
]


def main():
    random.seed(7)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(TRAIN, trainer=trainer)
    spec = json.loads(tk.to_str())
    vocab = spec["model"]["vocab"]
    vocab["Ġzyzzyva"] = len(vocab)  # no merge builds it: only ignore_merges finds it
    spec["model"]["ignore_merges"] = True
    n = len(vocab)
    spec["added_tokens"] = [
        {"id": n + i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True} for i, s in enumerate(SPECIALS)
    ] + [{"id": n + len(SPECIALS), "content": "wizardry", "single_word": False, "lstrip": False,
          "rstrip": False, "normalized": False, "special": False}]
    bos = n
    spec["post_processor"] = json.loads(processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)]),
    ]).__getstate__())
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    ref = Tokenizer.from_file(str(OUT / "tokenizer.json"))
    assert ref.encode(" zyzzyva", add_special_tokens=False).ids == [vocab["Ġzyzzyva"]]

    (OUT / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "chat_template": LLAMA3_TEMPLATE, "clean_up_tokenization_spaces": False,
    }, indent=1, ensure_ascii=False))

    write_gguf(ref, spec, bos, n + SPECIALS.index("<|eot_id|>"))

    pieces = [" ", "  ", "\n", "\r\n", "\t", "'s", "'LL", "'ſ", "hello", "World", "1", "1234", "٣",
              "!", "?!", "...", "é", "e\u0301", "日本", "😀", "\u00a0", "<|eot_id|>", "wizardry", "zyzzyva", "("]
    corpus = list(CORPUS)
    for _ in range(60):
        corpus.append("".join(random.choice(pieces) if random.random() < 0.7 else chr(random.randint(0x20, 0x2FFF))
                              for _ in range(random.randint(1, 10))))
    entries = []
    for text in corpus:
        ids = ref.encode(text, add_special_tokens=False).ids
        entries.append({"text": text, "ids": ids,
                        "ids_add_special": ref.encode(text, add_special_tokens=True).ids,
                        "decoded": ref.decode(ids, skip_special_tokens=False),
                        "decoded_skip_special": ref.decode(ids, skip_special_tokens=True)})
    (OUT / "corpus.json").write_text(json.dumps({
        "description": "Llama-3-style tiny tokenizer reference: ids = encode(text, add_special_tokens=False), "
                       "ids_add_special = encode(text, add_special_tokens=True), decoded(_skip_special) = decode(ids, ...). "
                       "Made by make_llama3_tiny.py with tokenizers %s." % tokenizers.__version__,
        "bos_id": bos, "eot_id": n + SPECIALS.index("<|eot_id|>"),
        "corpus": entries,
    }, indent=0, ensure_ascii=False))
    print(f"vocab {n} + {len(SPECIALS) + 1} added; {len(entries)} corpus strings")


def write_gguf(ref, spec, bos, eot):
    size = ref.get_vocab_size(with_added_tokens=True)
    tokens = [ref.id_to_token(i) for i in range(size)]
    types = [1] * size
    for t in spec["added_tokens"]:
        types[t["id"]] = 3 if t["special"] else 4
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    w = gguf.GGUFWriter(str(OUT / "tokenizer.gguf"), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eot)
    w.add_chat_template(LLAMA3_TEMPLATE)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
