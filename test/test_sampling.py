"""Every sampling parameter, logprobs, and parameter validation."""
import math

import pytest
import torch

from droidspeak.errors import InvalidRequestError
from droidspeak.sampling.params import SamplingParams
from droidspeak.sampling.sampler import SamplingRow, apply_penalties, filter_probs
from conftest import assert_no_leak

PROMPT = "Radix trees share prefixes"


def greedy(engine, prompt=PROMPT, **extra):
    return engine.generate(prompt, dict({"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}, **extra))


def test_greedy_equals_top_k_1_min_p_1_and_tiny_top_p(tiny_engine):
    ref = greedy(tiny_engine)["output_ids"]
    for extra in ({"temperature": 1.0, "top_k": 1}, {"temperature": 0.7, "min_p": 1.0},
                  {"temperature": 1.0, "top_p": 1e-6}):
        out = tiny_engine.generate(PROMPT, dict({"max_new_tokens": 16, "ignore_eos": True}, **extra))
        assert out["output_ids"] == ref, extra


def test_seeded_sampling_is_reproducible_and_seed_dependent(tiny_engine):
    params = {"temperature": 1.5, "max_new_tokens": 24, "ignore_eos": True}
    a = tiny_engine.generate(PROMPT, dict(params, sampling_seed=7))
    b = tiny_engine.generate(PROMPT, dict(params, sampling_seed=7))
    c = tiny_engine.generate(PROMPT, dict(params, seed=8))
    assert a["output_ids"] == b["output_ids"]
    assert a["output_ids"] != c["output_ids"]


def test_n_returns_n_distinct_samples(tiny_engine):
    outs = tiny_engine.generate(PROMPT, {"temperature": 1.5, "max_new_tokens": 16, "n": 3,
                                         "sampling_seed": 1, "ignore_eos": True})
    assert len(outs) == 3 and len({tuple(o["output_ids"]) for o in outs}) == 3
    assert_no_leak(tiny_engine)


def test_filter_probs_top_k_top_p_min_p():
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    assert filter_probs(probs, SamplingParams(top_k=2)).nonzero().flatten().tolist() == [0, 1]
    # top_p=0.8: 0.5 + 0.2 = 0.7 < 0.8, so 0.15 is needed too
    assert filter_probs(probs, SamplingParams(top_p=0.8)).nonzero().flatten().tolist() == [0, 1, 2]
    assert filter_probs(probs, SamplingParams(top_p=0.5)).nonzero().flatten().tolist() == [0]
    # min_p=0.3: keep p >= 0.3 * 0.5
    assert filter_probs(probs, SamplingParams(min_p=0.3)).nonzero().flatten().tolist() == [0, 1, 2]
    shuffled = probs[[3, 0, 4, 2, 1]]
    assert filter_probs(shuffled, SamplingParams(top_k=2)).nonzero().flatten().tolist() == [1, 4]


def row(params, prompt, output):
    return SamplingRow(params, prompt, output, torch.Generator(), [])


def test_greedy_takes_the_first_of_tied_maxima():
    from droidspeak.sampling.sampler import sample
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 8, (16, 49152), generator=g).float()  # every row has many tied maxima
    expected = [int((r == r.max()).nonzero()[0]) for r in logits]
    rows = [row(SamplingParams(temperature=0), [1], []) for _ in range(16)]
    assert sample(logits, rows, [0] * 16).token_ids == expected


def test_logprobs_only_for_the_rows_that_ask():
    """Rows without return_logprob skip the vocabulary-wide log-softmax; the rows
    that ask get the unpenalised distribution's logprobs and their own top-k."""
    from droidspeak.sampling.sampler import sample
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(3))
    want = torch.log_softmax(logits, -1)
    rows = [row(SamplingParams(temperature=0, repetition_penalty=1.5 if i == 2 else 1.0), [5, 7], [])
            for i in range(4)]
    got = sample(logits.clone(), rows, [0, 3, 2, 0], [False, True, True, False])
    for i in (1, 2):
        assert got.logprobs[i] == pytest.approx(float(want[i, got.token_ids[i]]), abs=1e-6)
    assert all(math.isnan(got.logprobs[i]) for i in (0, 3))
    assert [len(t) for t in got.top_logprobs] == [0, 3, 2, 0]
    assert [t for _, t in got.top_logprobs[1]] == want[1].topk(3).indices.tolist()
    assert sample(logits.clone(), rows, [0] * 4, [False] * 4).token_ids == got.token_ids


def test_penalties():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    out = apply_penalties(logits.clone(), row(SamplingParams(repetition_penalty=2.0), [0], [1]))
    assert out.tolist() == [1.0, -4.0, 1.0, 0.5]
    out = apply_penalties(logits.clone(), row(SamplingParams(frequency_penalty=0.5), [0], [2, 2, 3]))
    assert out.tolist() == [2.0, -2.0, 0.0, 0.0]
    out = apply_penalties(logits.clone(), row(SamplingParams(presence_penalty=0.25), [0], [2, 2, 3]))
    assert out.tolist() == [2.0, -2.0, 0.75, 0.25]


def test_penalties_change_generation(tiny_engine):
    ref = greedy(tiny_engine, max_new_tokens=32)["output_ids"]
    pen = greedy(tiny_engine, max_new_tokens=32, frequency_penalty=2.0)["output_ids"]
    rep = greedy(tiny_engine, max_new_tokens=32, repetition_penalty=2.0)["output_ids"]
    assert pen != ref and rep != ref
    # a strong frequency penalty makes repeats rarer
    assert len(set(pen)) >= len(set(ref))


def test_stop_strings_are_trimmed(tiny_engine):
    full = greedy(tiny_engine, max_new_tokens=32)
    text = full["text"]
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip() and stop in text
    out = greedy(tiny_engine, max_new_tokens=32, stop=[stop, "never-there"])
    assert out["text"] == text[:text.index(stop)]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    kept = greedy(tiny_engine, max_new_tokens=32, stop=stop, no_stop_trim=True)
    assert kept["text"].endswith(stop) or stop in kept["text"]


def test_stop_token_ids_and_min_new_tokens(tiny_engine):
    ref = greedy(tiny_engine)["output_ids"]
    tok = ref[3]
    first = ref.index(tok)
    out = greedy(tiny_engine, stop_token_ids=[tok])
    assert out["output_ids"] == ref[:first + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": tok}
    held = greedy(tiny_engine, stop_token_ids=[tok], min_new_tokens=first + 2)
    assert tok not in held["output_ids"][:first + 2]
    assert len(held["output_ids"]) >= first + 2


def test_max_new_tokens_and_ignore_eos(tiny_engine):
    ref = greedy(tiny_engine)["output_ids"]
    assert len(greedy(tiny_engine, max_new_tokens=5)["output_ids"]) == 5
    eos_before = tiny_engine.scheduler.eos_token_ids
    tiny_engine.scheduler.eos_token_ids = [ref[0]]  # make the first greedy token an EOS
    try:
        stopped = tiny_engine.generate(PROMPT, {"temperature": 0, "max_new_tokens": 16})
        ignored = tiny_engine.generate(PROMPT, {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True})
    finally:
        tiny_engine.scheduler.eos_token_ids = eos_before
    assert stopped["output_ids"] == ref[:1] and stopped["meta_info"]["finish_reason"]["type"] == "stop"
    assert ignored["output_ids"] == ref
    assert ignored["meta_info"]["finish_reason"] == {"type": "length", "length": 16}


def test_max_new_tokens_zero_returns_input_logprobs_only(tiny_engine):
    out = tiny_engine.generate(PROMPT, {"max_new_tokens": 0}, return_logprob=True, logprob_start_len=0)
    n = out["meta_info"]["prompt_tokens"]
    assert out["output_ids"] == [] and len(out["meta_info"]["input_token_logprobs"]) == n


def reference_logprobs(path, ids):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def test_logprobs_match_reference(tiny_llama, tiny_engine):
    tiny_engine.flush_cache()
    tiny_engine.generate(PROMPT, {"max_new_tokens": 1})  # warm the prefix cache: must not hide positions
    out = tiny_engine.generate(PROMPT, {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True},
                               return_logprob=True, logprob_start_len=2, top_logprobs_num=3,
                               return_text_in_logprobs=True)
    meta = out["meta_info"]
    prompt_ids = tiny_engine.tokenize(PROMPT)
    ref = reference_logprobs(tiny_llama, prompt_ids + out["output_ids"])
    inputs = meta["input_token_logprobs"]
    assert [t for _, t, _ in inputs] == prompt_ids[2:]
    for i, (lp, tid, text) in enumerate(inputs):
        assert lp == pytest.approx(ref[2 + i - 1, tid].item(), abs=1e-4)
        assert text == tiny_engine.tokenizer.decode([tid])
    for j, (lp, tid, _) in enumerate(meta["output_token_logprobs"]):
        pos = len(prompt_ids) - 1 + j
        assert tid == out["output_ids"][j]
        assert lp == pytest.approx(ref[pos, tid].item(), abs=1e-4)
        top = meta["output_top_logprobs"][j]
        assert [t for _, t, _ in top] == ref[pos].topk(3).indices.tolist()
        assert top[0][1] == tid  # greedy picks the top-1
    assert len(meta["input_top_logprobs"]) == len(inputs)


def test_input_logprobs_from_zero_start_with_none_first(tiny_engine):
    out = tiny_engine.generate(PROMPT, {"max_new_tokens": 1}, return_logprob=True, logprob_start_len=0)
    first = out["meta_info"]["input_token_logprobs"][0]
    assert first[0] is None and first[1] == tiny_engine.tokenize(PROMPT)[0]


@pytest.mark.parametrize("params,field", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": 0}, "top_k"),
    ({"min_p": 2}, "min_p"),
    ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"max_new_tokens": "ten"}, "max_new_tokens"),
    ({"min_new_tokens": 10, "max_new_tokens": 5}, "min_new_tokens"),
    ({"frequency_penalty": 3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"n": 0}, "n"),
    ({"stop": 5}, "stop"),
    ({"stop_token_ids": ["a"]}, "stop_token_ids"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
    ({"temprature": 0.5}, "temprature"),
])
def test_invalid_sampling_params(params, field):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams.from_dict(params)
    assert err.value.field == field and field in str(err.value)


def test_unsupported_sglang_fields_null_accepted_value_refused():
    assert SamplingParams.from_dict({"regex": None, "json_schema": None, "stop_regex": None}).max_new_tokens == 128
    with pytest.raises(InvalidRequestError, match="regex is not supported") as err:
        SamplingParams.from_dict({"regex": "[a-z]+"})
    assert err.value.field == "regex"


def test_input_logprobs_from_one_have_no_none(tiny_engine):
    ids = tiny_engine.tokenize(PROMPT)
    out = tiny_engine.generate(PROMPT, {"max_new_tokens": 0}, return_logprob=True, logprob_start_len=1)
    entries = out["meta_info"]["input_token_logprobs"]
    assert [t for _, t in entries] == ids[1:]
    assert all(isinstance(lp, float) for lp, _ in entries)
