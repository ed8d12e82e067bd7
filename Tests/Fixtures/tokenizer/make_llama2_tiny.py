"""Makes the Llama-2-style (SentencePiece BPE) tiny tokenizer fixture in llama2-tiny/.

A small SentencePiece BPE model trained here with `sentencepiece`, with the
settings of meta-llama/Llama-2-7b-hf's tokenizer.model: byte fallback, a dummy
prefix ("▁" before the text), no whitespace folding, identity normalization,
split digits, <unk>/<s>/</s> at ids 0/1/2; plus one user-defined piece
("wizardry"), which SentencePiece never splits.

Writes
- llama2-tiny/tokenizer.gguf: the vocabulary as GGUF metadata only, as
  llama.cpp's converter writes it (tokenizer.ggml.model = "llama", scores,
  token types, add_bos_token, add_space_prefix);
- llama2-tiny/tokenizer.json + tokenizer_config.json: the same vocabulary in
  Hugging Face's form, built the way transformers' LlamaConverter builds
  Llama 2's (legacy): normalizer Prepend("▁") + Replace(" ", "▁"), BPE with
  byte_fallback and merges ordered by piece score, TemplateProcessing adding <s>;
- llama2-tiny/tokenizer-metaspace.json: the same, in the newer (legacy=False,
  Mistral) form: no normalizer, Metaspace(prepend_scheme="first", split=False),
  the same decoder;
- llama2-tiny/corpus.json: for each text, the ids of Hugging Face `tokenizers`
  (without and with special tokens) and its decode, for both forms; and chat
  prompts rendered by transformers' chat-template renderer from the Llama 2
  chat template, with their ids (encoded without added specials, as
  apply_chat_template(tokenize=True) does). Texts without special
  tokens are also checked here against SentencePiece's own encode.

    $VENV/bin/python Tests/Fixtures/tokenizer/make_llama2_tiny.py
    ($VENV: as for make_llama3_tiny.py, plus `pip install sentencepiece`)
"""
import io
import json
import random
from pathlib import Path

import gguf
import sentencepiece as spm
import tokenizers
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

OUT = Path(__file__).resolve().parent / "llama2-tiny"
# meta-llama/Llama-2-7b-chat-hf's chat template (the model's data, kept as a file).
LLAMA2_TEMPLATE = (Path(__file__).resolve().parent.parent / "templates" / "llama-2-chat.jinja").read_text()

TRAIN = [
    "The quick brown fox jumps over the lazy dog. I'm sure you're right; we've seen it, they'll agree.",
    "In 2024 there were 1234567 tokens, 42 models and 3.14159 reasons to count to 1000.",
    "def tokenize(text):\n    return [t for t in text.split()]  # simple\n\nclass Foo:\n\tpass\n",
    "Hello world! Hello again, world. HELLO WORLD? hello, hello.\nNew line\n\n\nParagraph.",
    "Ünïcödé café naïve résumé — “quotes” and ‘quotes’ … Русский Ελληνικά.",
    "[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\nWhat is the capital of France? [/INST] Paris.",
    "A wizardry of words: the wizard said hello to the world, and the world said hello back.",
] * 30

CORPUS = [
    "", " ", "  ", "   ", "\t", "\n", "\n\n\n", " \n \n ", "Hello world", " Hello world", "Hello World",
    "  Hello  world  ", "Hello, world!", "hello\nworld", "tabs\tand\ttabs\t\t", "1 12 123 1234567", "3.14159",
    "Ünïcödé café naïve résumé", "e\u0301 a\u0308", "日本語のテキスト 中文 한국어", "😀🎉👍🏽 👨‍👩‍👧", "Emoji 😀 split",
    "Русский Ελληνικά", "\u00a0nbsp\u3000ideographic", "▁already▁metaspace", "<0x41> looks like a byte token",
    "<s>", "</s>", "<unk>", "<s>Hello</s>", "<s> Hello", "text</s>more", "</s> </s>  x", "<s><s></s>", "<s",
    "<s>[INST] What is the capital of France? [/INST]", "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]",
    "wizardry", "a wizardry wizardrys unwizardry", " wizardry", "wizardry wizard wizards",
    "def f(x):\n    return x ** 2  # square\n", "The quick brown fox jumps over the lazy dog.",
]


CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"},
     {"role": "assistant", "content": " Hello! "}, {"role": "user", "content": "wizardry 😀"}],
]


def train():
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAIN), model_writer=model, model_type="bpe", vocab_size=700,
        byte_fallback=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", split_digits=True, allow_whitespace_only_pieces=True,
        character_coverage=0.995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=["wizardry"], minloglevel=2, num_threads=1)
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def piece_type(sp, i):
    # llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    if sp.is_unknown(i): return 2
    if sp.is_control(i): return 3
    if sp.is_byte(i): return 6
    if sp.is_unused(i): return 5
    if i < 4 and sp.id_to_piece(i) == "wizardry": return 4
    return 1


def hf_tokenizer(sp):
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    vocab = {p: i for i, p in enumerate(pieces)}
    # LlamaConverter's merges: every split of a piece into two pieces, ordered
    # by the merged piece's score (higher first), then by the parts' ids.
    merges = []
    for i, p in enumerate(pieces):
        if piece_type(sp, i) != 1:
            continue
        splits = [(p[:k], p[k:]) for k in range(1, len(p))
                  if vocab.get(p[:k]) is not None and vocab.get(p[k:]) is not None
                  and piece_type(sp, vocab[p[:k]]) == 1 and piece_type(sp, vocab[p[k:]]) == 1]
        merges += [(-sp.get_score(i), vocab[a], vocab[b], a, b) for a, b in splits]
    merges.sort()
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for _, _, _, a, b in merges], unk_token="<unk>",
                              fuse_unk=True, byte_fallback=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(content=" ", left=1)])
    tk.add_special_tokens([AddedToken(pieces[i], normalized=False, special=True) for i in range(3)])
    tk.add_tokens([AddedToken("wizardry", normalized=False, special=False)])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return tk


def write_gguf(sp):
    n = sp.get_piece_size()
    w = gguf.GGUFWriter(str(OUT / "tokenizer.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types([piece_type(sp, i) for i in range(n)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)
    w.add_chat_template(LLAMA2_TEMPLATE)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    random.seed(11)
    sp = train()
    assert sp.id_to_piece(3) == "wizardry" and piece_type(sp, 3) == 4
    OUT.mkdir(parents=True, exist_ok=True)
    tk = hf_tokenizer(sp)
    tk.save(str(OUT / "tokenizer.json"))
    (OUT / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
        "add_eos_token": False, "legacy": True, "chat_template": LLAMA2_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }, indent=1, ensure_ascii=False))
    write_gguf(sp)
    ref = Tokenizer.from_file(str(OUT / "tokenizer.json"))
    tk.normalizer = None
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    # The decoder stays Replace/ByteFallback/Fuse/Strip, as in Mistral's tokenizer.json.
    tk.save(str(OUT / "tokenizer-metaspace.json"))
    meta = Tokenizer.from_file(str(OUT / "tokenizer-metaspace.json"))

    pieces = [" ", "  ", "\n", "\t", "hello", "World", "1", "1234", "!", "...", "é", "e\u0301", "日本", "😀",
              "\u00a0", "</s>", "<s>", "wizardry", "wizard", "▁", "(", "Ж", "\u2581x"]
    corpus = list(CORPUS)
    for _ in range(60):
        corpus.append("".join(random.choice(pieces) if random.random() < 0.7 else chr(random.randint(0x20, 0x2FFF))
                              for _ in range(random.randint(1, 10))))
    entries, checked = [], 0
    for text in corpus:
        ids = ref.encode(text, add_special_tokens=False).ids
        if not any(s in text for s in ["<s>", "</s>", "<unk>", "wizardry"]):
            assert ids == sp.encode(text), (text, ids, sp.encode(text))
            checked += 1
        entries.append({"text": text, "ids": ids,
                        "ids_add_special": ref.encode(text, add_special_tokens=True).ids,
                        "tokens": [ref.id_to_token(i) for i in ids],
                        "decoded": ref.decode(ids, skip_special_tokens=False),
                        "decoded_skip_special": ref.decode(ids, skip_special_tokens=True),
                        "ids_metaspace": meta.encode(text, add_special_tokens=False).ids,
                        "decoded_metaspace": meta.decode(meta.encode(text, add_special_tokens=False).ids,
                                                         skip_special_tokens=False)})
    from transformers.utils.chat_template_utils import render_jinja_template
    chats = []
    for messages in CHATS:
        rendered = render_jinja_template(conversations=[messages], chat_template=LLAMA2_TEMPLATE,
                                         add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
        text = rendered[0][0] if isinstance(rendered, tuple) else rendered[0]
        chats.append({"messages": messages, "prompt": text, "prompt_ids": ref.encode(text, add_special_tokens=False).ids})
    (OUT / "corpus.json").write_text(json.dumps({
        "chats": chats,
        "description": "Llama-2-style (SentencePiece BPE) tiny tokenizer reference: ids = encode(text, "
                       "add_special_tokens=False), ids_add_special = encode(text, add_special_tokens=True), "
                       "decoded(_skip_special) = decode(ids, ...) by Hugging Face tokenizers %s (its decoder strips "
                       "one leading space); *_metaspace: the same by tokenizer-metaspace.json. Texts without special or user-defined tokens give the same ids from "
                       "sentencepiece %s. Made by make_llama2_tiny.py." % (tokenizers.__version__, spm.__version__),
        "bos_id": 1, "eos_id": 2, "unk_id": 0,
        "corpus": entries,
    }, indent=0, ensure_ascii=False))
    print(f"vocab {sp.get_piece_size()}; {len(entries)} corpus strings, {checked} checked against sentencepiece")


if __name__ == "__main__":
    main()
