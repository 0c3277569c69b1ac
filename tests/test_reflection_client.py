"""An off-the-shelf reflection client (grpc_requests, as grpcurl would) calls the API with no
.proto files at all: it learns the services and messages from server reflection alone."""

from __future__ import annotations

import pytest

grpc_requests = pytest.importorskip("grpc_requests")

from tests.server_harness import ServerProcess, make_served_model  # noqa: E402


def test_off_the_shelf_client_generates_through_reflection(tmp_path) -> None:
    server = ServerProcess(make_served_model("llama", tmp_path / "llama"), tmp_path / "server.log")
    try:
        client = grpc_requests.Client.get_by_endpoint(server.address)
        assert "lightllm.v1.Generation" in client.service_names
        reply = client.request(
            "lightllm.v1.Generation",
            "Generate",
            {"token_ids": {"ids": [5, 6, 7]}, "stopping": {"max_new_tokens": 4, "ignore_eos": True}},
        )
    finally:
        server.stop()
    assert reply["finish_reason"] == "FINISH_REASON_LENGTH"
    assert len(reply["token_ids"]) == 4 and reply["usage"]["completion_tokens"] == 4
