"""The scheduler issue end to end over gRPC on a tiny fp32 model: cached prefixes, multi-turn
hits, chunking of cached and uncached parts, preemption under a tiny pool, n completions and
seeded sampling, each checked token for token (greedy against transformers, sampled
against the same request run alone)."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from lightllm_grpc.proto import generation_pb2 as pb
from tests.reference import assert_greedy_equal, reference_greedy
from tests.server_harness import ServerProcess, greedy_request, make_served_model

VOCAB = 512


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_served_model("llama3", tmp_path_factory.mktemp("model") / "llama3", vocab_size=VOCAB)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "server.log"
    # A small prefill budget: long prompts, cached or not, are chunked across steps.
    # Cascade attention on every shared prefix: the CPU backend checks each group it is sent.
    srv = ServerProcess(
        model_dir,
        log,
        *("--max-total-tokens", "2048", "--max-prefill-tokens", "16", "--cascade-min-shared-tokens", "1"),
    )
    yield srv
    srv.stop()


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(10, VOCAB) for _ in range(n)]


def _generate_all(server: ServerProcess, reqs: list[pb.GenerateRequest]) -> list[pb.GenerateResponse]:
    with ThreadPoolExecutor(len(reqs)) as pool:
        return list(pool.map(server.stub.Generate, reqs))


def _check_greedy(model_dir, prompts: list[list[int]], outs: list[list[int]], new: int) -> None:
    for i, ((ref, scores), ours) in enumerate(zip(reference_greedy(model_dir, prompts, new), outs)):
        assert_greedy_equal(f"prompt {i}", ours, ref, scores)


def test_shared_prefixes_are_served_from_the_cache(server, model_dir) -> None:
    rng = random.Random(7)
    prefix = _ids(rng, 70)
    prompts = [prefix + _ids(rng, 3 + 4 * i) for i in range(7)]
    before = server.info()
    first = server.stub.Generate(greedy_request(prompts[0], 16))
    rest = _generate_all(server, [greedy_request(p, 16) for p in prompts[1:]])
    after = server.wait_idle()
    _check_greedy(model_dir, prompts, [list(r.token_ids) for r in [first, *rest]], 16)
    assert all(r.usage.cached_tokens >= 70 for r in rest), [r.usage.cached_tokens for r in rest]
    assert after.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens >= 6 * 70
    # Rows decoding together over the cached prefix went as cascade groups (checked by the shard).
    assert after.num_cascade_decode_steps > before.num_cascade_decode_steps
    assert after.num_partial_prefills > before.num_partial_prefills  # chunks did happen
    assert after.kv_used_tokens == 0 and after.kv_cached_tokens > 0
    assert after.kv_free_tokens + after.kv_cached_tokens == after.kv_total_tokens


def test_multi_turn_conversation_hits_prompt_and_answer(server, model_dir) -> None:
    rng = random.Random(8)
    prompt, prompts, outs = _ids(rng, 30), [], []
    for turn in range(3):
        resp = server.stub.Generate(greedy_request(prompt, 12))
        prompts.append(prompt)
        outs.append(list(resp.token_ids))
        if turn:  # everything the last turn saw and said is cached
            assert resp.usage.cached_tokens >= len(prompts[-2]) + 12 - 1
        prompt = prompt + list(resp.token_ids) + _ids(rng, 10)
    _check_greedy(model_dir, prompts, outs, 12)


def _sampled(ids: list[int], seed: int, max_new: int, n: int = 1) -> pb.GenerateRequest:
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), n=n)
    req.sampling.temperature = 1.0
    req.sampling.top_k = 40
    req.sampling.seed = seed
    req.stopping.max_new_tokens = max_new
    req.stopping.ignore_eos = True
    return req


def test_n_completions_equal_seeded_requests_sent_alone(server) -> None:
    prompt = _ids(random.Random(9), 25)
    together = server.stub.Generate(_sampled(prompt, 100, 20, n=4))
    assert [c.index for c in together.completions] == [0, 1, 2, 3]
    alone = [list(server.stub.Generate(_sampled(prompt, 100 + i, 20)).token_ids) for i in range(4)]
    assert [list(c.token_ids) for c in together.completions] == alone
    assert len({tuple(a) for a in alone}) == 4  # distinct completions
    assert list(together.token_ids) == alone[0]
    assert together.usage.completion_tokens == 80 and together.usage.prompt_tokens == 25
    stream = list(server.stub.GenerateStream(_sampled(prompt, 100, 20, n=4)))
    by_index: dict[int, list[int]] = {}
    for msg in stream:
        by_index.setdefault(msg.index, []).extend(msg.token_ids)
    assert [by_index[i] for i in range(4)] == alone
    assert sum(m.finish_reason != pb.FINISH_REASON_UNSPECIFIED for m in stream) == 4
    assert server.wait_idle().kv_used_tokens == 0


def test_n_above_the_limit_is_refused(server) -> None:
    import grpc

    with pytest.raises(grpc.RpcError) as err:
        server.stub.Generate(_sampled([11, 12], 1, 4, n=17))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "n must be" in err.value.details()


def test_flush_cache_frees_only_unused_tokens(server) -> None:
    server.stub.Generate(greedy_request(_ids(random.Random(10), 20), 4))
    info = server.wait_idle()
    assert info.kv_cached_tokens > 0
    freed = server.stub.FlushCache(pb.FlushCacheRequest()).freed_tokens
    after = server.info()
    assert freed == info.kv_cached_tokens and after.kv_cached_tokens == 0
    assert after.kv_free_tokens == after.kv_total_tokens


def test_preemption_in_a_tiny_pool_keeps_every_output_exact(model_dir, tmp_path) -> None:
    check_preemption(model_dir, tmp_path)


def check_preemption(model_dir, tmp_path, *extra: str) -> None:
    server = ServerProcess(
        model_dir, tmp_path / "server.log", "--max-total-tokens", "256", "--max-prefill-tokens", "32", *extra
    )
    try:
        rng = random.Random(11)
        for _ in range(25):  # a history of one-token answers: Past-Future expects short outputs
            server.stub.Generate(greedy_request(_ids(rng, 8), 1))
        greedy_prompts = [_ids(rng, 12 + i) for i in range(8)]
        sampled_prompts = [_ids(rng, 10 + i) for i in range(4)]
        reqs = [greedy_request(p, 48) for p in greedy_prompts]
        reqs += [_sampled(p, 500 + i, 48) for i, p in enumerate(sampled_prompts)]
        crowd = _generate_all(server, reqs)
        info = server.wait_idle()
        assert info.num_preemptions > 0
        assert info.kv_used_tokens == 0 and info.kv_free_tokens + info.kv_cached_tokens == 256
        for i, p in enumerate(sampled_prompts):  # alone, with no pressure: the same tokens
            alone = server.stub.Generate(_sampled(p, 500 + i, 48))
            assert list(crowd[8 + i].token_ids) == list(alone.token_ids)
        assert all(r.usage.completion_tokens == 48 for r in crowd)
    finally:
        server.stop()
    _check_greedy(model_dir, greedy_prompts, [list(r.token_ids) for r in crowd[:8]], 48)


def test_no_prefix_cache_prefills_every_prompt(model_dir, tmp_path) -> None:
    server = ServerProcess(
        model_dir, tmp_path / "server.log", "--no-prefix-cache", "--max-total-tokens", "512"
    )
    try:
        prompt = _ids(random.Random(12), 30)
        a, b = (server.stub.Generate(greedy_request(prompt, 8)) for _ in range(2))
        info = server.wait_idle()
        assert list(a.token_ids) == list(b.token_ids)
        assert b.usage.cached_tokens == 0 and not info.prefix_cache_enabled
        assert info.kv_cached_tokens == 0 and info.kv_free_tokens == 512
    finally:
        server.stop()


def test_prompt_logprobs_match_transformers_across_chunks(server, model_dir) -> None:
    """Prompt logprobs of a 40-token prompt prefilled in 16-token chunks, twice (the second
    time its prompt is cached, yet it must be computed again): transformers' log-softmax."""
    import torch
    from transformers import AutoModelForCausalLM

    prompt = _ids(random.Random(13), 40)
    req = greedy_request(prompt, 3)
    req.response.prompt_logprobs = True
    stream = list(server.stub.GenerateStream(req))
    unary = server.stub.Generate(req)
    assert [lp.token_id for lp in stream[0].prompt_logprobs] == prompt[1:]
    assert all(not m.prompt_logprobs for m in stream[1:])  # the first message only
    assert unary.usage.cached_tokens == 0  # computed again, not taken from the cache
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)
    expected = ref[torch.arange(39), torch.tensor(prompt[1:])]
    for got in (stream[0].prompt_logprobs, unary.prompt_logprobs):
        values = torch.tensor([lp.logprob for lp in got])
        torch.testing.assert_close(values, expected, atol=1e-3, rtol=1e-3)
