"""Chat format: render_conversation ids/mask layout, render_for_completion, and validation errors (offline, CPU)."""

import pytest
from pydoc_data.topics import topics

from nanochat.longdoc_qa import LongDocQAConfig, longdoc_qa
from nanochat.tokenizer import Tokenizer

CONVERSATION = {"messages": [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4, of course."},
    {"role": "user", "content": "And <|assistant_end|> 3+3?"},  # special-token text in content stays ordinary text
    {"role": "assistant", "content": "It is 6.\nDone."},
]}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_from_iterator(iter([topics[name] for name in sorted(topics)[:12]]), 400)


def special(tok, name):
    return tok.encode_special(f"<|{name}|>")


def test_render_layout(tok):
    ids, mask = tok.render_conversation(CONVERSATION)
    m = CONVERSATION["messages"]
    expected_ids, expected_mask = [tok.bos_token_id], [0]
    for role, content, learn in [("system", m[0]["content"], 0), ("user", m[1]["content"], 0), ("assistant", m[2]["content"], 1),
                                 ("user", m[3]["content"], 0), ("assistant", m[4]["content"], 1)]:
        body = tok.encode(content)
        expected_ids += [special(tok, f"{role}_start")] + body + [special(tok, f"{role}_end")]
        expected_mask += [0] + [learn] * len(body) + [learn]
    assert ids == expected_ids and mask == expected_mask
    assert ids.count(special(tok, "assistant_end")) == 2  # the one typed by the user is ordinary text


def test_mask_is_exactly_assistant_contents_and_end(tok):
    ids, mask = tok.render_conversation(CONVERSATION)
    runs, run = [], []  # contiguous stretches of mask == 1
    for i, m in zip(ids, mask, strict=True):
        if m:
            run.append(i)
        elif run:
            runs, run = runs + [run], []
    runs += [run] if run else []
    assert [tok.decode(r) for r in runs] == ["4, of course.<|assistant_end|>", "It is 6.\nDone.<|assistant_end|>"]
    for i, m in zip(ids, mask, strict=True):
        if i in (special(tok, "assistant_start"), tok.bos_token_id, special(tok, "user_end"), special(tok, "system_end")):
            assert m == 0


def test_bare_list_and_extra_keys(tok):
    as_list = tok.render_conversation(CONVERSATION["messages"])
    with_meta = tok.render_conversation({**CONVERSATION, "meta": {"source": "x"}})
    assert as_list == with_meta == tok.render_conversation(CONVERSATION)


def test_truncation(tok):
    ids, mask = tok.render_conversation(CONVERSATION)
    short_ids, short_mask = tok.render_conversation(CONVERSATION, max_tokens=10)
    assert short_ids == ids[:10] and short_mask == mask[:10]
    assert tok.render_conversation(CONVERSATION, max_tokens=10_000) == (ids, mask)


def test_render_for_completion(tok):
    prompt = CONVERSATION["messages"][:4]
    ids = tok.render_for_completion(prompt)
    assert ids[-1] == special(tok, "assistant_start")
    assert ids[:-1] == tok.render_conversation(prompt)[0]
    assert ids == tok.render_conversation(CONVERSATION)[0][:len(ids)]  # the prompt is a prefix of the full render
    with pytest.raises(ValueError, match="message 4: the last message must be a user message"):
        tok.render_for_completion(CONVERSATION)


def test_longdoc_example_renders(tok):
    cfg = LongDocQAConfig(doc_words=300, n_facts=3, n_distractors=3)
    for example in longdoc_qa(5, cfg):
        ids, mask = tok.render_conversation(example)
        learned = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
        assert learned == example["messages"][1]["content"] + "<|assistant_end|>"
        assert example["meta"]["answer"] in learned


U, A = "user", "assistant"


def msg(role, content="hi"):
    return {"role": role, "content": content}


MALFORMED = [
    ([], "conversation has no messages"),
    ({"messages": []}, "conversation has no messages"),
    ("hello", "a conversation is .* got str"),
    ({"turns": []}, "a conversation is .* got dict"),
    ([msg("bot")], "message 0: unknown role 'bot'"),
    ([msg(U), msg(A), msg("system")], "message 2: a system message may only be the first"),
    ([msg(U), msg(A), msg(A)], "message 2: expected role 'user', got 'assistant'"),
    ([msg(U), msg(U)], "message 1: expected role 'assistant', got 'user'"),
    ([msg(A)], "message 0: expected role 'user', got 'assistant'"),
    ([msg("system"), msg(A)], "message 1: expected role 'user', got 'assistant'"),
    ([msg("system")], "only a system message"),
    ([msg(U, "")], r"message 0 \(user\): content is empty"),
    ([msg(U), msg(A, " \n\t")], r"message 1 \(assistant\): content is empty"),
    ([msg(U, 5)], r"message 0 \(user\): content must be a str, got int"),
    ([msg(U, None)], "content must be a str, got NoneType"),
    ([msg(U, ["a"])], "content must be a str, got list"),
    ([{"role": U}], "message 0: expected a dict with 'role' and 'content'"),
    (["hi"], "message 0: expected a dict with 'role' and 'content'"),
]


@pytest.mark.parametrize("conversation, error", MALFORMED)
def test_malformed_raises(tok, conversation, error):
    with pytest.raises(ValueError, match=error):
        tok.render_conversation(conversation)
    with pytest.raises(ValueError, match=error):
        tok.render_for_completion(conversation)
