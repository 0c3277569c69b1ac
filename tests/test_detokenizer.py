from __future__ import annotations

import random

import pytest

from lightllm_grpc.models.tiny_tokenizer import build_tokenizer
from lightllm_grpc.text.detokenizer import Detokenizer, DetokState
from lightllm_grpc.text.stop import StopStringMatcher


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(400)


def _stream(detok: Detokenizer, ids: list[int], clean: bool = True) -> str:
    state = DetokState()
    text = ""
    for i in ids:
        state.ids.append(i)
        (delta,) = detok.step([state])
        if clean:  # valid text must never show a half-decoded character
            assert "\ufffd" not in delta
        text += delta
    return text


def test_multibyte_text_streams_exactly(tok) -> None:
    detok = Detokenizer(tok.backend_tokenizer)
    text = "Hello 東京 naïve 🙂 привет — café!"
    ids = tok.encode(text, add_special_tokens=False)
    assert _stream(detok, ids) == tok.decode(ids, skip_special_tokens=True) == text


def test_random_ids_never_emit_broken_utf8_and_match_decode(tok) -> None:
    detok = Detokenizer(tok.backend_tokenizer)
    rng = random.Random(0)
    for _ in range(30):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 40))]
        streamed = _stream(detok, ids, clean=False)
        full = tok.decode(ids, skip_special_tokens=True)
        # Random bytes can be invalid UTF-8 for good (decode shows U+FFFD too); ids that
        # may still complete a character are held back, so only a tail may be missing.
        assert full.startswith(streamed)
        assert set(full[len(streamed) :]) <= {"\ufffd"}


def test_batched_step_matches_single(tok) -> None:
    detok = Detokenizer(tok.backend_tokenizer)
    a, b = DetokState(), DetokState()
    ids_a = tok.encode("the river ran", add_special_tokens=False)
    ids_b = tok.encode("東京 🙂 ok", add_special_tokens=False)
    out_a = out_b = ""
    for i in range(max(len(ids_a), len(ids_b))):
        states = []
        if i < len(ids_a):
            a.ids.append(ids_a[i])
            states.append(a)
        if i < len(ids_b):
            b.ids.append(ids_b[i])
            states.append(b)
        deltas = detok.step(states)
        for s, d in zip(states, deltas):
            if s is a:
                out_a += d
            else:
                out_b += d
    assert out_a == "the river ran" and out_b == "東京 🙂 ok"


def test_stop_matcher_finds_across_boundaries_and_holds_back() -> None:
    m = StopStringMatcher(["STOP", "xy"], include_in_output=False)
    assert m.hold == 3
    text = "abc ST"
    assert m.find(text, 0) is None
    assert m.safe_end(text) == len(text) - 3
    text += "OP more"
    match = m.find(text, 6)
    assert match is not None and match.stop == "STOP" and match.text_end == 4
    inc = StopStringMatcher(["STOP"], include_in_output=True).find(text, 0)
    assert inc is not None and inc.text_end == 8


def test_stop_matcher_earliest_wins() -> None:
    m = StopStringMatcher(["bbb", "a"], include_in_output=False)
    match = m.find("xxbbba", 0)
    assert match is not None and match.stop == "bbb" and match.text_end == 2


def test_special_tokens_skipped_shown_or_spaced(tok) -> None:
    detok = Detokenizer(tok.backend_tokenizer)
    user, end = tok.convert_tokens_to_ids(["<|user|>", "<|end|>"])
    ids = [user, *tok.encode("hi there", add_special_tokens=False), end, end]
    cases = {
        (True, False): "hi there",
        (True, True): "hi there",  # nothing to space out when specials are skipped
        (False, False): "<|user|>hi there<|end|><|end|>",
        (False, True): "<|user|> hi there <|end|> <|end|>",
    }
    for (skip, spaces), want in cases.items():
        state = DetokState(skip_special_tokens=skip, spaces_between_special_tokens=spaces)
        text = ""
        for i in ids:
            state.ids.append(i)
            (delta,) = detok.step([state])
            text += delta
        assert text == want == detok.decode_state(state), (skip, spaces)
    assert tok.decode(ids, skip_special_tokens=False) == cases[(False, False)]


def test_a_step_mixes_requests_with_different_options(tok) -> None:
    detok = Detokenizer(tok.backend_tokenizer)
    user = tok.convert_tokens_to_ids("<|user|>")
    states = [DetokState(), DetokState(skip_special_tokens=False), DetokState()]
    for s in states:
        s.ids.extend([user, *tok.encode("ok", add_special_tokens=False)])
    assert detok.step(states) == ["ok", "<|user|>ok", "ok"]
