"""Fixtures several end-to-end test modules share: a tiny served Llama and a CPU server on it.

Module-scoped, so each module gets its own server; a module that needs other server flags
defines its own ``server`` fixture, which takes precedence.
"""

from __future__ import annotations

import pytest

from tests.server_harness import ServerProcess, make_served_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_served_model("llama", tmp_path_factory.mktemp("model") / "llama")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = ServerProcess(model_dir, tmp_path_factory.mktemp("log") / "server.log", "--max-total-tokens", "400")
    yield srv
    srv.stop()
