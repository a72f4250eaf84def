"""The offline Engine API: shapes of results, streaming, input forms."""
import pytest

from droidspeak import Engine
from droidspeak.errors import InvalidRequestError
from conftest import assert_no_leak

P = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}


def test_result_shape(tiny_engine):
    out = tiny_engine.generate("The quick brown fox", P)
    assert set(out) == {"text", "output_ids", "meta_info"}
    meta = out["meta_info"]
    assert meta["prompt_tokens"] == len(tiny_engine.tokenize("The quick brown fox"))
    assert meta["completion_tokens"] == 8 and meta["finish_reason"] == {"type": "length", "length": 8}
    assert isinstance(meta["id"], str) and meta["e2e_latency"] > 0
    assert out["text"] == tiny_engine.tokenizer.decode(out["output_ids"], skip_special_tokens=True)


def test_input_ids_and_text_agree(tiny_engine):
    ids = tiny_engine.tokenize("def add(a, b):")
    a = tiny_engine.generate("def add(a, b):", P)
    b = tiny_engine.generate(input_ids=ids, sampling_params=P)
    c = tiny_engine.generate(input_ids=[ids, ids], sampling_params=[P, dict(P, max_new_tokens=3)])
    assert a["output_ids"] == b["output_ids"] == c[0]["output_ids"]
    assert c[1]["output_ids"] == a["output_ids"][:3]


def test_stream_is_cumulative_and_ends_like_non_stream(tiny_engine):
    ref = tiny_engine.generate("Caching keys", P)
    chunks = list(tiny_engine.generate("Caching keys", P, stream=True))
    assert [len(c["output_ids"]) for c in chunks] == list(range(1, 9))
    assert chunks[-1]["output_ids"] == ref["output_ids"] and chunks[-1]["text"] == ref["text"]
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    batch = list(tiny_engine.generate(["a b", "c d"], P, stream=True))
    assert {c["index"] for c in batch} == {0, 1}
    assert_no_leak(tiny_engine)


def test_rids(tiny_engine):
    assert tiny_engine.generate("x", P, rid="mine")["meta_info"]["id"] == "mine"
    outs = tiny_engine.generate(["x", "y"], P, rid=["r1", "r2"])
    assert [o["meta_info"]["id"] for o in outs] == ["r1", "r2"]
    with pytest.raises(InvalidRequestError, match="rid"):
        tiny_engine.generate(["x", "y"], P, rid="one")


def test_bad_inputs(tiny_engine):
    with pytest.raises(InvalidRequestError, match="exactly one"):
        tiny_engine.generate()
    with pytest.raises(InvalidRequestError, match="text"):
        tiny_engine.generate([1, 2])
    with pytest.raises(InvalidRequestError, match="sampling_params"):
        tiny_engine.generate(["a", "b"], [P])
    assert_no_leak(tiny_engine)


def test_bf16_engine_runs(tiny_llama):
    engine = Engine(tiny_llama, dtype="bfloat16", max_total_tokens=512)
    assert engine.runner.kv_pool.k.dtype.is_floating_point and str(engine.runner.kv_pool.k.dtype) == "torch.bfloat16"
    out = engine.generate("The quick brown fox", P)
    assert len(out["output_ids"]) == 8


def test_memory_budget_from_fraction(tiny_llama):
    engine = Engine(tiny_llama, dtype="float32", mem_fraction_static=0.01)
    assert engine.runner.max_total_tokens >= engine.runner.context_length
    with pytest.raises(InvalidRequestError, match="mem_fraction_static"):
        Engine(tiny_llama, mem_fraction_static=1.5)


def test_per_prompt_logprob_arguments(tiny_engine):
    outs = tiny_engine.generate(["a b", "c d"], {"max_new_tokens": 1}, return_logprob=[True, False],
                                logprob_start_len=[0, 1], top_logprobs_num=[2, 0])
    first, second = (o["meta_info"] for o in outs)
    assert first["input_token_logprobs"][0][0] is None and len(first["input_top_logprobs"][1]) == 2
    assert "input_token_logprobs" not in second
    with pytest.raises(InvalidRequestError, match="logprob_start_len has 1 entries for 2 prompts") as err:
        tiny_engine.generate(["a", "b"], P, return_logprob=True, logprob_start_len=[0])
    assert err.value.field == "logprob_start_len"
    assert_no_leak(tiny_engine)


@pytest.mark.parametrize("command", ["generate", "profile", "serve", "prepare-model"])
def test_cli_help_lists_every_engine_flag(command, capsys):
    """--help renders (a stray % in a help text breaks argparse) and shows the flags."""
    from droidspeak.cli import main
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    if command != "prepare-model":
        for flag in ("--models-file", "--cross-model-quality", "--disable-cross-model", "--max-total-tokens"):
            assert flag in out
