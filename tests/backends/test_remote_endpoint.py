"""Endpoint presets and resolution of the --remote value."""

from __future__ import annotations

import pytest

from glmcode.backends.remote import RemoteBackend, resolve_endpoint
from glmcode.errors import AuthError, UsageError
from tests.backends.conftest import KEY
from tests.fake_glm_server import FakeGlmServer


@pytest.mark.parametrize("spec", [None, "", "zhipu", "ZHIPU"])
def test_bare_remote_is_the_bigmodel_api_with_its_key(spec):
    endpoint = resolve_endpoint(spec, {"ZHIPUAI_API_KEY": KEY, "ZAI_API_KEY": "other-key"})
    assert endpoint.base_url == "https://open.bigmodel.cn/api/paas/v4"
    assert endpoint.chat_url == "https://open.bigmodel.cn/api/paas/v4/chat/completions"
    assert (endpoint.name, endpoint.hosted, endpoint.key_variable, endpoint.api_key) == ("zhipu", True, "ZHIPUAI_API_KEY", KEY)


def test_zai_preset_reads_its_own_key():
    endpoint = resolve_endpoint("zai", {"ZHIPUAI_API_KEY": "wrong-one", "ZAI_API_KEY": KEY})
    assert endpoint.base_url == "https://api.z.ai/api/paas/v4"
    assert (endpoint.hosted, endpoint.key_variable, endpoint.api_key, endpoint.label) == (True, "ZAI_API_KEY", KEY, "api.z.ai")


@pytest.mark.parametrize("spec, variable", [("zhipu", "ZHIPUAI_API_KEY"), ("zai", "ZAI_API_KEY")])
def test_a_hosted_preset_without_a_key_names_the_variable_to_set(spec, variable):
    with pytest.raises(AuthError, match=variable):
        resolve_endpoint(spec, {"GLMCODE_API_KEY": "not-for-hosted"})


def test_a_key_from_the_config_file_wins_over_the_environment():
    endpoint = resolve_endpoint("zai", {"ZAI_API_KEY": "from-env"}, api_key="from-config")
    assert endpoint.api_key == "from-config"


def test_a_base_url_is_a_generic_server_with_an_optional_key():
    endpoint = resolve_endpoint("http://gpu-box:8000/v1/", {})
    assert (endpoint.name, endpoint.base_url, endpoint.hosted, endpoint.api_key) == ("custom", "http://gpu-box:8000/v1", False, None)
    assert endpoint.key_variable == "GLMCODE_API_KEY"
    assert resolve_endpoint("http://gpu-box:8000/v1", {"GLMCODE_API_KEY": KEY}).api_key == KEY


def test_a_pasted_chat_completions_url_is_trimmed_to_the_base():
    endpoint = resolve_endpoint("https://llm.example.com/v1/chat/completions", {})
    assert endpoint.chat_url == "https://llm.example.com/v1/chat/completions"


def test_a_url_on_a_hosted_host_keeps_the_hosted_dialect_and_key():
    # e.g. the Coding Plan endpoint, given as a URL
    endpoint = resolve_endpoint("https://api.z.ai/api/coding/paas/v4", {"ZAI_API_KEY": KEY})
    assert (endpoint.hosted, endpoint.key_variable, endpoint.api_key) == (True, "ZAI_API_KEY", KEY)
    assert endpoint.base_url == "https://api.z.ai/api/coding/paas/v4"


@pytest.mark.parametrize("spec, hint", [("openai", "http://host:8000/v1"), ("localhost:8000/v1", "http://localhost:8000/v1")])
def test_an_unknown_preset_is_a_usage_error_with_a_hint(spec, hint):
    with pytest.raises(UsageError) as raised:
        resolve_endpoint(spec, {})
    message = str(raised.value)
    assert "zhipu" in message and "zai" in message and hint in message


def test_the_key_stays_out_of_repr():
    endpoint = resolve_endpoint("zhipu", {"ZHIPUAI_API_KEY": KEY})
    backend = RemoteBackend(endpoint)
    assert KEY not in repr(endpoint) and KEY not in str(endpoint)
    assert KEY not in repr(backend) and KEY not in backend.name
    backend.close()


def test_window_and_token_counting_defaults():
    hosted = RemoteBackend(resolve_endpoint("zhipu", {"ZHIPUAI_API_KEY": KEY}))
    generic = RemoteBackend(resolve_endpoint("http://127.0.0.1:9/v1", {}))
    configured = RemoteBackend(resolve_endpoint("http://127.0.0.1:9/v1", {}), context_window=32768)
    assert (hosted.context_window, generic.context_window, configured.context_window) == (200_000, 131_072, 32768)
    assert hosted.count_tokens([{"role": "user", "content": "hi"}], []) is None
    assert hosted.name == "glm-4.7-flash @ open.bigmodel.cn"
    assert (hosted.concurrency, generic.concurrency) == (1, 0)
    for backend in (hosted, generic, configured):
        backend.close()


def test_the_served_context_window_comes_from_the_models_list():
    with FakeGlmServer(dialect="openai", max_model_len=65536) as server:
        backend = RemoteBackend(resolve_endpoint(server.base_url, {}))
        assert backend.probe_context_window() == 65536
        other_model = RemoteBackend(resolve_endpoint(server.base_url, {}), model="another-model")
        assert other_model.probe_context_window() is None
    with FakeGlmServer(dialect="openai") as server:  # no max_model_len advertised
        assert RemoteBackend(resolve_endpoint(server.base_url, {})).probe_context_window() is None
