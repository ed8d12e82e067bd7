"""Drives a running LoraMux server with the official `openai` Python package.

Usage: python3 openai_client_check.py BASE_URL BASE_MODEL ADAPTER EXPECTED_JSON
EXPECTED_JSON holds {"prompt": ..., "max_tokens": N, "adapter_text": ..., "base_text": ...}
made by `loramux generate` for the same greedy requests. Exits non-zero on the
first mismatch, printing what differed.
"""
import json
import sys

from openai import OpenAI


def main() -> int:
    base_url, base_model, adapter, expected_path = sys.argv[1:5]
    with open(expected_path) as f:
        exp = json.load(f)
    client = OpenAI(base_url=base_url + "/v1", api_key="unused")

    models = {m.id for m in client.models.list().data}
    assert base_model in models and adapter in models, models
    assert client.models.retrieve(adapter).id == adapter

    msgs = [{"role": "user", "content": exp["prompt"]}]
    for model, key in ((adapter, "adapter_text"), (base_model, "base_text")):
        chat = client.chat.completions.create(model=model, messages=msgs, max_tokens=exp["max_tokens"], temperature=0)
        got = chat.choices[0].message.content
        assert got == exp[key], f"chat {model}: {got!r} != {exp[key]!r}"
        assert chat.usage.completion_tokens > 0

        stream = client.chat.completions.create(model=model, messages=msgs, max_tokens=exp["max_tokens"], temperature=0, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == exp[key], f"streamed chat {model}: {text!r} != {exp[key]!r}"

        chunks = list(client.chat.completions.create(model=model, messages=msgs, max_tokens=exp["max_tokens"], temperature=0,
                                                      stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == chat.usage.completion_tokens, chunks[-1]
        assert all(c.usage is None for c in chunks[:-1]), chunks

    comp = client.completions.create(model=adapter, prompt="The capital of France is", max_tokens=8, temperature=0,
                                     extra_body={"return_token_ids": True})
    assert comp.choices[0].text, comp
    assert len(comp.choices[0].model_extra["token_ids"]) == 8, comp.choices[0].model_extra
    pieces = [c.choices[0].text for c in client.completions.create(model=adapter, prompt="The capital of France is",
                                                                     max_tokens=8, temperature=0, stream=True)]
    assert "".join(pieces) == comp.choices[0].text, (pieces, comp.choices[0].text)

    # Logprobs as the client's types read them (chat: content entries; completions: parallel lists).
    lp = client.chat.completions.create(model=adapter, messages=msgs, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    entries = lp.choices[0].logprobs.content
    assert len(entries) == lp.usage.completion_tokens, entries
    assert "".join(e.token for e in entries) == lp.choices[0].message.content, entries
    for e in entries:
        assert e.logprob <= 0 and len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob == e.logprob, e
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token, e
    echo = client.completions.create(model=base_model, prompt="The capital of France is", max_tokens=3, temperature=0,
                                     logprobs=1, echo=True, frequency_penalty=0.5, presence_penalty=0.5)
    clp = echo.choices[0].logprobs
    assert echo.choices[0].text.startswith("The capital of France is"), echo
    assert clp.token_logprobs[0] is None and clp.top_logprobs[0] is None, clp
    assert len(clp.tokens) == len(clp.token_logprobs) == len(clp.text_offset) == echo.usage.prompt_tokens + 3, clp
    assert all(v <= 0 for v in clp.token_logprobs[1:]), clp

    many = client.chat.completions.create(model=adapter, messages=msgs, max_tokens=6, temperature=1, seed=3, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2], many
    assert 3 <= many.usage.completion_tokens <= 18, many.usage
    assert many.usage.prompt_tokens_details.cached_tokens >= 0, many.usage
    seen = {}
    for chunk in client.chat.completions.create(model=adapter, messages=msgs, max_tokens=6, temperature=1, seed=3, n=3, stream=True):
        for c in chunk.choices:
            seen[c.index] = seen.get(c.index, "") + (c.delta.content or "")
    assert seen == {c.index: c.message.content for c in many.choices}, (seen, many)

    try:
        client.completions.create(model="no-such-adapter", prompt="x", max_tokens=2)
        raise AssertionError("unknown model accepted")
    except Exception as e:  # openai.NotFoundError
        assert getattr(e, "status_code", None) == 404, e
    print("openai client checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
