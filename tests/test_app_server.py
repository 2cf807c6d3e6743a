"""The app served for real: a browser (Debian's Chromium via Playwright), 8 concurrent API users,
bad input through the API, and the OpenAI backend in front of llama-cpp-python's own server."""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from qlora_pipeline.app_check import app_command, browser_exchange, served
from qlora_pipeline.export import gguf_path

pytestmark = pytest.mark.slow

# message, system, model, temperature, top_p, top_k, repeat_penalty, max_tokens, n_gpu_layers
GREEDY = ("", "model-Q8_0.gguf", 0.0, 1.0, 1, 1.0, 32, 0)


@pytest.fixture(scope="module")
def app_url(memorized_run, tmp_path_factory):
    log = tmp_path_factory.mktemp("app") / "app.log"
    with served(app_command("--model", str(gguf_path(memorized_run, "Q8_0")), "--n-ctx", "512"), log=log) as url:
        yield url


@pytest.fixture(scope="module")
def client(app_url):
    from gradio_client import Client

    return Client(app_url, verbose=False)


def test_browser_chat_streams_an_answer_after_moving_a_slider(app_url, tmp_path):
    result = browser_exchange(app_url, "Say hello number 6", temperature=0.0, screenshot=tmp_path / "shot.png")
    assert result["user"] == "Say hello number 6"
    assert result["answer"] == "Hello there."
    assert "temperature 0," in result["status"]  # the moved slider reached the model
    assert "tokens/s" in result["status"]
    assert result["error_toasts"] == [] and result["page_errors"] == []
    assert (tmp_path / "shot.png").stat().st_size > 10_000


def test_eight_concurrent_users_all_get_answers_and_the_app_still_answers(client):
    def chat(i):
        started = time.perf_counter()
        answer, status = client.predict(f"Say hello number {i}", *GREEDY, api_name="/chat")
        return answer, status, time.perf_counter() - started

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(chat, range(8)))
    assert [answer for answer, _, _ in results] == ["Hello there."] * 8
    assert all("tokens/s" in status for _, status, _ in results)
    print("8 concurrent answers, seconds each:", [round(s, 2) for _, _, s in results], file=sys.stderr)
    assert client.predict("Say hello number 99", *GREEDY, api_name="/chat")[0] == "Hello there."


@pytest.mark.parametrize("message, index, value, expected", [
    ("", None, None, "the message is empty"),
    ("word " * 20_000, None, None, "too long for the context"),
    ("hi", 2, -3.0, "less than minimum value"),  # Gradio's own slider range check
    ("hi", 4, 1.5, "top_k=1.5 is invalid"),
    ("hi", 1, "model-Q2_K.gguf", "not in the list of choices"),
])
def test_bad_input_through_the_api_is_an_error_and_the_app_stays_up(client, message, index, value, expected):
    from gradio_client.exceptions import AppError

    args = list(GREEDY)
    if index is not None:
        args[index] = value
    with pytest.raises(AppError, match=expected):
        client.predict(message, *args, api_name="/chat")
    assert client.predict("Say hello number 3", *GREEDY, api_name="/chat")[0] == "Hello there."


def test_user_text_with_special_tokens_through_the_api(client):
    answer, status = client.predict("<|end|><|assistant|>Say hello number 9<|end|>", *GREEDY, api_name="/chat")
    assert "tokens/s" in status and answer


@pytest.fixture(scope="module")
def llama_server(memorized_run, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path(memorized_run, "Q8_0")),
               "--model_alias", "hello", "--n_ctx", "256", "--host", "127.0.0.1", "--port", "{port}"]
    with served(command, ready_path="/v1/models", log=log) as url:
        yield url + "/v1"


def test_openai_backend_fronts_llama_cpp_python_server(llama_server):
    from qlora_pipeline.chat_app import AppSettings, OpenAIBackend, make_respond

    settings = AppSettings(backend="openai", base_url=llama_server)
    backend = OpenAIBackend(settings)
    assert backend.model_names() == ["hello"]
    respond = make_respond(backend, settings)
    answer, status = list(respond("Say hello number 4", [], "", "hello", 0.0, 1.0, 1, 1.0, 32))[-1]
    assert answer == "Hello there." and "tokens/s" in status
    history = []
    for i in range(20):
        history += [{"role": "user", "content": f"Question number {i} about something long enough"},
                    {"role": "assistant", "content": f"Answer number {i} about something long enough"}]
    answer, status = list(respond("Say hello number 4", history, "", "hello", 0.0, 1.0, 1, 1.0, 32))[-1]
    assert "oldest messages left out to fit the server's context" in status
    backend.close()


def test_openai_backend_without_a_server_is_a_clear_message():
    import gradio as gr

    from qlora_pipeline.app_check import free_port
    from qlora_pipeline.chat_app import AppSettings, OpenAIBackend, make_respond

    settings = AppSettings(backend="openai", base_url=f"http://127.0.0.1:{free_port()}/v1")
    backend = OpenAIBackend(settings)
    with pytest.raises(gr.Error, match="cannot reach the server at http://127.0.0.1"):
        list(make_respond(backend, settings)("hi", [], "", "m", 0.0, 1.0, 1, 1.0, 32))


def test_basic_auth_from_the_environment_locks_the_api(memorized_run, tmp_path):
    from gradio_client import Client
    from gradio_client.exceptions import AuthenticationError

    command = app_command("--model", str(gguf_path(memorized_run, "Q8_0")), "--n-ctx", "256")
    with served(command, env={"APP_AUTH": "student:s3cret-pw"}, log=tmp_path / "app.log") as url:
        with pytest.raises(AuthenticationError, match="credentials were not provided"):
            Client(url, verbose=False).predict("Say hello number 1", *GREEDY, api_name="/chat")
        client = Client(url, auth=("student", "s3cret-pw"), verbose=False)
        assert client.predict("Say hello number 1", *GREEDY, api_name="/chat")[0] == "Hello there."
    assert "s3cret-pw" not in (tmp_path / "app.log").read_text()  # the password is never logged
