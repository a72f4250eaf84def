"""LoRA adapters: equal to merged weights, co-batched with the base, loaded and
unloaded at run time without leaks."""
import signal

import httpx
import pytest

from droidspeak import Engine
from droidspeak.errors import InvalidRequestError, ModelNotFoundError, UnsupportedModelError
from conftest import assert_no_leak
from helpers import build_lora_adapter, build_tiny_model, merge_lora

GREEDY = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
PROMPTS = ["The quick brown fox", "def add(a, b):", "Radix trees share prefixes"]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = build_tiny_model(str(root / "base"), "qwen2", seed=0)  # qkv biases too
    a1 = build_lora_adapter(base, str(root / "a1"), seed=1)
    a2 = build_lora_adapter(base, str(root / "a2"), seed=2, rank=8, targets=("q_proj", "v_proj"))
    return {"base": base, "a1": a1, "a2": a2,
            "m1": merge_lora(base, a1, str(root / "m1")), "m2": merge_lora(base, a2, str(root / "m2"))}


@pytest.fixture(scope="module")
def engine(paths):
    return Engine(paths["base"], dtype="float32", served_model_name="base", max_total_tokens=4096,
                  lora_paths=(f"a1={paths['a1']}", f"a2={paths['a2']}"))


def test_lora_equals_merged_weights_and_co_batches(paths, engine):
    reqs = []
    for name in ("base", "a1", "a2"):
        for p in PROMPTS:
            reqs.extend(engine.make_requests(p, GREEDY, model=name)[0])
    for _ in engine._drive(reqs):
        pass
    got = {name: [r.output_ids for r in reqs[i * 3:(i + 1) * 3]] for i, name in enumerate(("base", "a1", "a2"))}
    for name, ref_path in (("base", paths["base"]), ("a1", paths["m1"]), ("a2", paths["m2"])):
        ref = Engine(ref_path, dtype="float32", max_total_tokens=1024).generate(PROMPTS, GREEDY)
        assert got[name] == [o["output_ids"] for o in ref], name
    assert got["a1"] != got["base"] and got["a2"] != got["base"]
    assert engine.lineage["a1"].parent == "base"
    assert_no_leak(engine)


@pytest.mark.parametrize("max_rows", [32, 1])
def test_native_layers_apply_lora_as_the_python_layers(paths, monkeypatch, max_rows):
    """bf16 forwards with adapters run their layers in one native call, each
    adapter's update after its projection as lora/batch.py adds it: the same
    tokens and bit-identical logprobs as layer by layer, with the base and two
    adapters (one updating q and v only) in one batch; max_rows=1 sends most
    adapters' rows through torch's matmul instead of the grouped kernel."""
    from droidspeak import kernels
    from droidspeak.models.llama import LlamaForCausalLM
    monkeypatch.setattr(kernels, "GROUPED_KERNEL_MAX_ROWS", max_rows)
    engine = Engine(paths["base"], dtype="bfloat16", served_model_name="base", max_total_tokens=4096,
                    lora_paths=(f"a1={paths['a1']}", f"a2={paths['a2']}"))

    def run():
        reqs = []
        for name in ("base", "a1", "a2"):
            for p in PROMPTS:
                reqs.extend(engine.make_requests(p, GREEDY, model=name, return_logprob=True)[0])
        for _ in engine._drive(reqs):
            pass
        engine.flush_cache()
        return [(r.output_ids, r.output_token_logprobs) for r in reqs]
    calls = []
    stack = LlamaForCausalLM._layer_stack
    monkeypatch.setattr(LlamaForCausalLM, "_layer_stack", lambda self, *a: calls.append(1) or stack(self, *a))
    native = run()
    assert len(calls) >= GREEDY["max_new_tokens"]
    monkeypatch.setattr(LlamaForCausalLM, "_native_layers", staticmethod(lambda hidden, batch: False))
    layer_by_layer = run()
    assert layer_by_layer == native
    assert native[3][0] != native[0][0] and native[6][0] != native[0][0]  # the adapters change the output
    assert_no_leak(engine)


def test_load_and_unload_at_run_time(paths, engine):
    engine.load_lora_adapter("late", paths["a1"])
    late = engine.generate(PROMPTS[0], GREEDY, model="late")
    assert late["output_ids"] == engine.generate(PROMPTS[0], GREEDY, model="a1")["output_ids"]
    # a fresh adapter never hits another adapter's cache entries
    assert late["meta_info"]["cached_tokens"] == 0
    reqs, _ = engine.make_requests(PROMPTS[1], GREEDY, model="late")
    engine.scheduler.add_request(reqs[0])
    with pytest.raises(InvalidRequestError, match="serving 1 request"):
        engine.unload_lora_adapter("late")
    engine.scheduler.abort_request(reqs[0].rid)
    engine.unload_lora_adapter("late")
    assert "late" not in engine.model_names
    with pytest.raises(ModelNotFoundError):
        engine.generate(PROMPTS[0], GREEDY, model="late")
    with pytest.raises(InvalidRequestError, match="already loaded"):
        engine.load_lora_adapter("a1", paths["a1"])
    assert_no_leak(engine)


def test_bad_adapters(paths, tmp_path):
    with pytest.raises(ModelNotFoundError, match="not a PEFT LoRA adapter"):
        Engine(paths["base"], dtype="float32", max_total_tokens=256, lora_paths=(f"x={tmp_path}",))
    deeper = build_tiny_model(str(tmp_path / "deep"), "qwen2", num_layers=5)
    bad = build_lora_adapter(deeper, str(tmp_path / "bad"), seed=0)
    with pytest.raises(UnsupportedModelError, match="layer 3 but the base has 3"):
        Engine(paths["base"], dtype="float32", max_total_tokens=256, lora_paths=(f"bad={bad}",))


def test_lora_over_http(paths, engine):
    from test_server import start_server
    proc, url = start_server(paths["base"], "--served-model-name", "base")
    try:
        r = httpx.post(url + "/load_lora_adapter", json={"lora_name": "a1", "lora_path": paths["a1"]})
        assert r.status_code == 200 and r.json()["loaded_adapters"] == {"a1": paths["a1"]}
        ref = engine.generate(PROMPTS[0], GREEDY, model="a1")["output_ids"]
        out = httpx.post(url + "/generate", json={"text": PROMPTS[0], "sampling_params": GREEDY, "lora_path": "a1"})
        assert out.json()["output_ids"] == ref
        models = {m["id"]: m for m in httpx.get(url + "/v1/models").json()["data"]}
        assert models["a1"]["parent"] == "base"
        assert httpx.post(url + "/unload_lora_adapter", json={"lora_name": "a1"}).json()["loaded_adapters"] == {}
        gone = httpx.post(url + "/generate", json={"text": "x", "lora_path": "a1"})
        assert gone.status_code == 404
        bad = httpx.post(url + "/load_lora_adapter", json={"lora_name": "b", "lora_path": "/nonexistent"})
        assert bad.status_code == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
