"""A stock SGLang frontend program against droidspeak through sgl.RuntimeEndpoint."""
import pytest

import sglang as sgl  # the pinned frontend the set-up installs (see the Makefile)

from test_server import start_server  # noqa: E402
from helpers import build_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    import signal
    path = build_tiny_model(str(tmp_path_factory.mktemp("sgl")), "llama")
    proc, url = start_server(path)
    backend = sgl.RuntimeEndpoint(url + "/models/tiny")
    sgl.set_default_backend(backend)
    yield backend
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


@sgl.function
def qa(s, question):
    s += "Q: " + question + "\n"
    s += "A:" + sgl.gen("answer", max_tokens=8, temperature=0)
    s += "\nIs that right? " + sgl.select("verdict", choices=["yes", "no", "maybe"])


@sgl.function
def chat(s, first, second):
    s += sgl.system("You are terse.")
    s += sgl.user(first)
    s += sgl.assistant(sgl.gen("a1", max_tokens=6, temperature=0))
    s += sgl.user(second)
    s += sgl.assistant(sgl.gen("a2", max_tokens=6, temperature=0))


def test_gen_and_select(endpoint):
    state = qa.run(question="What is a radix tree?")
    assert isinstance(state["answer"], str)
    assert state["verdict"] in ("yes", "no", "maybe")
    again = qa.run(question="What is a radix tree?")
    assert again["answer"] == state["answer"] and again["verdict"] == state["verdict"]


def test_multi_turn_chat(endpoint):
    state = chat.run(first="Hello", second="And then?")
    msgs = state.messages()
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    # the frontend strips message text
    assert msgs[2]["content"] == state["a1"].strip() and msgs[4]["content"] == state["a2"].strip()


def test_run_batch(endpoint):
    states = qa.run_batch([{"question": q} for q in ("a?", "b?", "c?")], num_threads=2)
    single = qa.run(question="b?")
    assert len(states) == 3 and states[1]["answer"] == single["answer"]


def test_streaming(endpoint):
    state = qa.run(question="Stream this?", stream=True)
    pieces = list(state.text_iter("answer"))
    state.sync()  # the program goes on to its select: wait for all of it
    assert "".join(pieces) == state["answer"]
    assert state["verdict"] in ("yes", "no", "maybe")
