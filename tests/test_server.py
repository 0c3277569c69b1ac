"""End to end over real gRPC: streaming, sampling, stops, cancellation, validation, info RPCs."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightllm_grpc.proto import generation_pb2 as pb
from tests.server_harness import ServerProcess, greedy_request, make_served_model

KV_TOKENS = 400


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_served_model("llama", tmp_path_factory.mktemp("model") / "llama")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "server.log"
    srv = ServerProcess(
        model_dir,
        log,
        *("--max-total-tokens", str(KV_TOKENS), "--max-prefill-tokens", "64", "--max-waiting-requests", "8"),
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(str(model_dir))


def _stream(server: ServerProcess, req: pb.GenerateRequest) -> list[pb.GenerateStreamResponse]:
    return list(server.stub.GenerateStream(req))


def sampled_request(text: str, seed: int, max_new: int = 24) -> pb.GenerateRequest:
    req = pb.GenerateRequest(text=text)
    req.sampling.temperature = 0.9
    req.sampling.top_p = 0.95
    req.sampling.top_k = 50
    req.sampling.seed = seed
    req.stopping.max_new_tokens = max_new
    req.stopping.ignore_eos = True
    return req


def test_both_processes_freeze_their_startup_objects(server) -> None:
    """The coordinator and its shard each freeze what start-up left (after warm-up), so no full
    garbage collection walks torch, transformers and the model while requests are served."""
    log = server.log_path.read_text(errors="replace")
    for process in ("coordinator", "shard"):
        assert re.search(rf"{process}: \d+ start-up objects frozen out of garbage collection", log), process


def test_stream_deltas_concatenate_to_unary_result(server, tokenizer) -> None:
    req = sampled_request("the river ran over the hills", seed=11, max_new=40)
    msgs = _stream(server, req)
    unary = server.stub.Generate(req)
    assert "".join(m.text for m in msgs) == unary.text
    assert [t for m in msgs for t in m.token_ids] == list(unary.token_ids)
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in msgs[:-1])
    last = msgs[-1]
    assert last.finish_reason == pb.FINISH_REASON_LENGTH == unary.finish_reason
    prompt_len = len(tokenizer.encode("the river ran over the hills"))
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (prompt_len, 40)
    assert unary.text == tokenizer.decode(list(unary.token_ids), skip_special_tokens=True)
    assert all(not m.HasField("usage") for m in msgs[:-1])


def test_seeded_sampling_is_batch_independent(server) -> None:
    target = sampled_request("a young girl and her dog", seed=4242)
    alone = server.stub.Generate(target)
    others = [sampled_request(f"word {i} light house", seed=i) for i in range(6)]
    with ThreadPoolExecutor(7) as pool:
        futures = [pool.submit(server.stub.Generate, r) for r in others[:3]]
        mixed = pool.submit(server.stub.Generate, target)
        futures += [pool.submit(server.stub.Generate, r) for r in others[3:]]
        together = mixed.result()
        [f.result() for f in futures]
    assert list(together.token_ids) == list(alone.token_ids)
    assert together.text == alone.text
    different = server.stub.Generate(sampled_request("a young girl and her dog", seed=4243))
    assert list(different.token_ids) != list(alone.token_ids)


def test_logprobs_match_transformers(server, model_dir) -> None:
    ids = [5, 77, 300, 12, 9, 401]
    req = greedy_request(ids, 4)
    req.response.logprobs = True
    req.response.top_logprobs = 3
    resp = server.stub.Generate(req)
    assert len(resp.logprobs) == 4
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([ids + list(resp.token_ids)])).logits[0]
    ref = torch.log_softmax(logits[len(ids) - 1 : -1], dim=-1)
    for step, lp in enumerate(resp.logprobs):
        assert lp.token_id == resp.token_ids[step]
        assert abs(lp.logprob - ref[step, lp.token_id].item()) < 1e-3
        assert [t.token_id for t in lp.top] == ref[step].topk(3).indices.tolist()
        assert lp.top[0].token_id == lp.token_id  # greedy picks the most likely


def test_stop_strings_trim_and_include(server) -> None:
    base = server.stub.Generate(greedy_request([20, 30, 40, 50], 40))
    text = base.text
    assert len(text) > 12
    stop = text[6:9]
    first = text.find(stop)
    req = greedy_request([20, 30, 40, 50], 40)
    req.stopping.stop.append(stop)
    cut = server.stub.Generate(req)
    assert cut.finish_reason == pb.FINISH_REASON_STOP and cut.stop_reason == stop
    assert cut.text == text[:first]
    req.stopping.include_stop_str_in_output = True
    msgs = _stream(server, req)
    assert "".join(m.text for m in msgs) == text[: first + len(stop)]


def test_stop_token_ids_and_min_new_tokens(server) -> None:
    base = server.stub.Generate(greedy_request([7, 8, 9], 20))
    stop_id = base.token_ids[5]
    first = list(base.token_ids).index(stop_id)
    req = greedy_request([7, 8, 9], 20)
    req.stopping.stop_token_ids.append(stop_id)
    resp = server.stub.Generate(req)
    assert resp.finish_reason == pb.FINISH_REASON_STOP
    assert list(resp.token_ids) == list(base.token_ids[: first + 1])
    assert resp.stop_reason == str(stop_id)
    req.stopping.min_new_tokens = first + 2  # the stop id is masked until then
    resp = server.stub.Generate(req)
    assert len(resp.token_ids) >= first + 2
    assert stop_id not in list(resp.token_ids)[: first + 2]


def test_cancelled_stream_frees_kv(server) -> None:
    req = greedy_request([1, 2, 3, 4, 5], 300)
    call = server.stub.GenerateStream(req)
    got = 0
    for msg in call:
        got += len(msg.token_ids)
        if got >= 3:
            assert server.info().kv_used_tokens > 0
            call.cancel()
            break
    info = server.wait_idle()
    assert (info.kv_used_tokens, info.running_requests) == (0, 0)
    assert info.kv_free_tokens + info.kv_cached_tokens == KV_TOKENS


def test_deadline_aborts_and_frees_kv(server) -> None:
    with pytest.raises(grpc.RpcError) as err:
        # 390 tokens take ~0.4 s here (about 1 ms each): the deadline lands mid-decode with
        # room for a machine four times faster (300 tokens at 0.3 s once left no room at all).
        server.stub.Generate(greedy_request([1, 2, 3], 390), timeout=0.1)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    info = server.wait_idle()
    assert info.kv_used_tokens == 0 and info.running_requests == 0


def test_abort_rpc_ends_the_stream(server) -> None:
    req = greedy_request([4, 5, 6], 300)
    req.request_id = "to-abort"
    msgs: list[pb.GenerateStreamResponse] = []
    reader = threading.Thread(target=lambda: msgs.extend(server.stub.GenerateStream(req)))
    reader.start()
    deadline = time.monotonic() + 10
    while not msgs and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.stub.Abort(pb.AbortRequest(request_id="to-abort")).aborted
    reader.join(10)
    assert msgs[-1].finish_reason == pb.FINISH_REASON_ABORT
    assert not server.stub.Abort(pb.AbortRequest(request_id="to-abort")).aborted  # idempotent
    assert not server.stub.Abort(pb.AbortRequest(request_id="never-existed")).aborted
    assert server.wait_idle().kv_used_tokens == 0


def _invalid(**fields) -> pb.GenerateRequest:
    req = greedy_request([1, 2, 3], 8)
    for path, value in fields.items():
        msg, name = req, path
        if "__" in path:
            part, name = path.split("__")
            msg = getattr(req, part)
        if isinstance(value, list):
            getattr(msg, name).extend(value)
        else:
            setattr(msg, name, value)
    return req


INVALID = [
    (_invalid(sampling__temperature=-0.5), "sampling.temperature"),
    (_invalid(sampling__top_p=0.0), "sampling.top_p"),
    (_invalid(sampling__top_p=1.5), "sampling.top_p"),
    (_invalid(sampling__top_k=0), "sampling.top_k"),
    (_invalid(sampling__top_k=-2), "sampling.top_k"),
    (_invalid(sampling__min_p=1.5), "sampling.min_p"),
    (_invalid(sampling__repetition_penalty=0.0), "sampling.repetition_penalty"),
    (_invalid(sampling__presence_penalty=3.0), "sampling.presence_penalty"),
    (_invalid(sampling__frequency_penalty=-2.5), "sampling.frequency_penalty"),
    (_invalid(stopping__max_new_tokens=0), "stopping.max_new_tokens"),
    (_invalid(stopping__max_new_tokens=100000), "stopping.max_new_tokens"),
    (_invalid(stopping__min_new_tokens=50), "stopping.min_new_tokens"),
    (_invalid(stopping__stop=["x"] * 17), "stopping.stop"),
    (_invalid(stopping__stop=["y" * 257]), "stopping.stop[0]"),
    (_invalid(stopping__stop=[""]), "stopping.stop[0]"),
    (_invalid(stopping__stop_token_ids=[99999]), "stopping.stop_token_ids"),
    (_invalid(response__top_logprobs=21), "response.top_logprobs"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 600])), "prompt.token_ids"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[])), "prompt"),
    (pb.GenerateRequest(), "prompt"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[3] * 512)), "prompt"),
    (pb.GenerateRequest(text="hi", request_id="x" * 300), "request_id"),
    (pb.GenerateRequest(chat=pb.Chat()), "chat.messages"),
]


@pytest.mark.parametrize(("req", "field"), INVALID, ids=[f for _, f in INVALID])
def test_invalid_requests_name_the_field(server, req, field) -> None:
    for call in (server.stub.Generate, lambda r: list(server.stub.GenerateStream(r))):
        with pytest.raises(grpc.RpcError) as err:
            call(req)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in err.value.details()


def test_request_larger_than_the_kv_pool_is_resource_exhausted(server) -> None:
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Generate(greedy_request([3] * 200, 300))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "KV" in err.value.details()
    assert server.wait_idle().kv_used_tokens == 0


def test_duplicate_live_request_id_is_rejected(server) -> None:
    req = greedy_request([4, 5, 6], 300)
    req.request_id = "dup"
    call = server.stub.GenerateStream(req)
    next(iter(call))
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Generate(req)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    call.cancel()
    server.wait_idle()


def test_chat_tokenize_and_info(server, tokenizer) -> None:
    chat = pb.Chat(messages=[pb.ChatMessage(role="user", content="hello world")])
    tok = server.stub.Tokenize(pb.TokenizeRequest(chat=chat))
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello world"}], add_generation_prompt=True, tokenize=False
    )
    assert list(tok.ids) == tokenizer.encode(expected, add_special_tokens=False)
    plain = server.stub.Tokenize(pb.TokenizeRequest(text="hello world"))
    assert list(plain.ids) == tokenizer.encode("hello world")
    assert list(plain.tokens) == tokenizer.convert_ids_to_tokens(list(plain.ids))
    req = pb.GenerateRequest(chat=chat)
    req.sampling.temperature = 0
    req.stopping.max_new_tokens = 5
    req.stopping.ignore_eos = True
    assert server.stub.Generate(req).usage.prompt_tokens == len(tok.ids)
    info = server.stub.GetModelInfo(pb.GetModelInfoRequest())
    assert (info.architecture, info.vocab_size, info.context_length) == ("LlamaForCausalLM", 512, 512)
    assert info.tp_size == 1 and info.dtype == "float32" and info.has_chat_template
    assert info.kv_cache_dtype == "float32"  # --kv-cache-dtype auto: the model dtype
    sinfo = server.info()
    assert sinfo.kv_total_tokens == KV_TOKENS and sinfo.max_running_requests == 256
    assert sinfo.kv_cache_dtype == "float32"


def test_full_queue_is_resource_exhausted_and_leaves_nothing_behind(server) -> None:
    # Each request reserves most of the KV pool, so one runs and the rest queue (limit 8).
    calls = [server.stub.GenerateStream(greedy_request([9, 8, 7], 300)) for _ in range(14)]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and sum(c.done() for c in calls) < 5:
        time.sleep(0.02)
    rejected = [c for c in calls if c.done() and c.code() == grpc.StatusCode.RESOURCE_EXHAUSTED]
    for call in calls:
        call.cancel()
    assert len(rejected) >= 5
    assert "queue is full" in rejected[0].details()
    info = server.wait_idle()
    assert (info.kv_used_tokens, info.running_requests, info.waiting_requests) == (0, 0, 0)


def test_oversized_message_is_resource_exhausted(server) -> None:
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Generate(pb.GenerateRequest(text="x" * (17 * 1024 * 1024)))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
