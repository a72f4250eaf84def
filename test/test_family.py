"""Several fine-tunes of one base in one engine: lineage, co-batching, per-model
prefix-cache namespaces."""
import signal

import httpx
import pytest
import torch

from droidspeak import Engine
from droidspeak.errors import ModelNotFoundError, UnsupportedModelError
from helpers import build_tiny_model, derive_finetune, pytest_without_amx
from conftest import assert_no_leak

GREEDY = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
PROMPTS = ["The quick brown fox", "def add(a, b):", "Radix trees share prefixes", "Caching keys and values"]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    base = build_tiny_model(str(root / "base"), "llama", seed=0)
    ft1 = derive_finetune(base, str(root / "ft1"), seed=1)
    ft2 = derive_finetune(base, str(root / "ft2"), seed=2, declare_base="base")
    return {"base": base, "ft1": ft1, "ft2": ft2}


@pytest.fixture(scope="module")
def family_engine(family):
    return Engine(family["base"], dtype="float32", served_model_name="base", max_total_tokens=4096,
                  models=(f"ft1={family['ft1']}", f"ft2={family['ft2']}"))


def run_mixed(engine, jobs):
    """Submit (model, prompt) jobs together, so that batches mix models."""
    reqs = []
    for model, prompt in jobs:
        r, _ = engine.make_requests(prompt, GREEDY, model=model)
        reqs.extend(r)
    for _ in engine._drive(reqs):
        pass
    return [r.output_ids for r in reqs]


def test_a_batched_call_routes_each_prompt_to_its_own_member(family_engine):
    names = ["ft2", "base", "ft1", "ft2"]
    alone = [family_engine.generate(p, GREEDY, model=m)["output_ids"] for p, m in zip(PROMPTS, names)]
    mixed = family_engine.generate(PROMPTS, GREEDY, model=names)
    assert [r["output_ids"] for r in mixed] == alone
    assert_no_leak(family_engine)


def test_lineage(family_engine):
    lin = family_engine.lineage
    assert family_engine.model_names == ["base", "ft1", "ft2"]
    assert lin["base"].parent is None and lin["ft1"].parent == "base" and lin["ft2"].parent == "base"
    assert lin["ft1"].evidence.startswith("embedding cosine") and lin["ft2"].evidence == "declared"


def test_embedding_similarity_of_a_default_model_sized_matrix():
    """A model's embedding against itself reads 1 and a fine-tune's under 1 (the
    lineage evidence), for a matrix of the default model's size (28M entries,
    where fp32 sums read 1.003 on an AVX2 CPU)."""
    from droidspeak.models.lineage import embedding_similarity
    g = torch.Generator().manual_seed(0)
    a = torch.randn(49152, 576, generator=g)
    tuned = a + 0.05 * torch.randn(a.shape, generator=g)
    assert abs(embedding_similarity(a, a) - 1) < 1e-9
    cos = embedding_similarity(a, tuned)
    assert 0.99 < cos < 1 and abs(cos - 1 / (1 + 0.05 ** 2) ** 0.5) < 1e-4
    assert abs(embedding_similarity(a, torch.randn(a.shape, generator=g))) < 0.01


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_co_batched_equals_solo(family, family_engine, dtype, monkeypatch):
    # bf16 decode runs the linear layers through the grouped native kernel, whose
    # per-row sums do not depend on the other rows or members in the call
    if dtype != "float32":
        family_engine = Engine(family["base"], dtype=dtype, served_model_name="base", max_total_tokens=4096,
                               models=(f"ft1={family['ft1']}", f"ft2={family['ft2']}"))
    jobs = [(m, p) for p in PROMPTS for m in ("base", "ft1", "ft2")]
    seen = []
    runner = family_engine.runner
    original = runner.forward

    def spy(batch, extra_rows=None):
        seen.append(set(batch.model_ids or [0]))
        return original(batch, extra_rows)
    runner.forward = spy
    # attention runs once per layer over every row of the mixed batch (bf16 decode
    # runs its layers in one native call, fp32 layer by layer through the kernels)
    attention_rows = spy_decode_rows(monkeypatch)
    try:
        mixed = run_mixed(family_engine, jobs)
    finally:
        runner.forward = original
    assert any(len(s) == 3 for s in seen), "no batch mixed the three models"
    assert max(attention_rows) == len(jobs)
    for name in ("base", "ft1", "ft2"):
        solo = Engine(family[name], dtype=dtype, max_total_tokens=2048)
        outs = solo.generate(PROMPTS, GREEDY)
        assert [o["output_ids"] for o in outs] == [ids for (m, _), ids in zip(jobs, mixed) if m == name]
    # the fine-tunes really differ from the base
    assert mixed[0] != mixed[1] or mixed[3] != mixed[4]
    assert_no_leak(family_engine)


def spy_decode_rows(monkeypatch) -> list[int]:
    """Rows of every decode attention call, on either decode path."""
    from droidspeak import kernels
    from droidspeak.models.llama import LlamaForCausalLM
    rows = []
    decode_attention, layer_stack = kernels.decode_attention, LlamaForCausalLM._layer_stack

    def attention_spy(q, *args):
        rows.append(q.shape[0])
        return decode_attention(q, *args)

    class StackSpy:
        def __init__(self, stack):
            self.stack = stack

        def run(self, hidden, start, end, *args):
            if args[13]:  # run's `decode` flag (after rows .. extend_lens)
                rows.extend([hidden.shape[0]] * (end - start))
            return self.stack.run(hidden, start, end, *args)
    monkeypatch.setattr(kernels, "decode_attention", attention_spy)
    monkeypatch.setattr(LlamaForCausalLM, "_layer_stack", lambda self, *a: StackSpy(layer_stack(self, *a)))
    return rows


@pytest.mark.parametrize("max_rows", [32, 2])
def test_native_layers_equal_layer_by_layer(family, monkeypatch, max_rows):
    """bf16 forwards run their layers in one native call (csrc/layer_stack.cpp);
    it calls the same kernels in the same order as the Python layers, so a mixed
    family batch gets the same tokens and bit-identical logprobs either way. With
    max_rows=2 most members' rows exceed the grouped kernel and go through torch's
    matmul inside the native call."""
    from droidspeak import kernels
    from droidspeak.models.llama import LlamaForCausalLM
    monkeypatch.setattr(kernels, "GROUPED_KERNEL_MAX_ROWS", max_rows)
    engine = Engine(family["base"], dtype="bfloat16", served_model_name="base", max_total_tokens=4096,
                    models=(f"ft1={family['ft1']}", f"ft2={family['ft2']}"))
    jobs = [(m, p) for p in PROMPTS for m in ("base", "ft1", "ft2")] + [("ft1", "ab")]
    params = dict(GREEDY, max_new_tokens=16)

    def run():
        reqs = []
        for model, prompt in jobs:
            r, _ = engine.make_requests(prompt, params, model=model, return_logprob=True, logprob_start_len=0)
            reqs.extend(r)
        for _ in engine._drive(reqs):
            pass
        engine.flush_cache()
        return [(r.output_ids, r.output_token_logprobs, r.input_token_logprobs) for r in reqs]
    fused_rows = spy_decode_rows(monkeypatch)
    fused = run()
    assert fused_rows and kernels.layer_stack_available(torch.zeros(1, dtype=torch.bfloat16))
    monkeypatch.setattr(LlamaForCausalLM, "_native_layers", staticmethod(lambda hidden, batch: False))
    assert run() == fused
    assert_no_leak(engine)


def test_prefix_cache_is_per_model(family_engine):
    family_engine.flush_cache()
    a = family_engine.generate(PROMPTS[3], GREEDY, model="base")
    b = family_engine.generate(PROMPTS[3], GREEDY, model="ft1")
    c = family_engine.generate(PROMPTS[3], GREEDY, model="ft1")
    n = a["meta_info"]["prompt_tokens"]
    assert b["meta_info"]["cached_tokens"] == 0  # ft1 never reuses base's KV (yet)
    assert c["meta_info"]["cached_tokens"] == n - 1 and c["output_ids"] == b["output_ids"]
    with pytest.raises(ModelNotFoundError, match="ft1"):
        family_engine.generate("x", GREEDY, model="nope")


def test_unrelated_models_are_refused(family, tmp_path):
    stranger = build_tiny_model(str(tmp_path / "stranger"), "llama", seed=123)
    with pytest.raises(UnsupportedModelError, match="embeddings are unrelated"):
        Engine(family["base"], dtype="float32", max_total_tokens=1024, models=(f"s={stranger}",))
    deeper = build_tiny_model(str(tmp_path / "deeper"), "llama", seed=0, num_layers=4)
    with pytest.raises(UnsupportedModelError, match="num_layers is 4 vs 3"):
        Engine(family["base"], dtype="float32", max_total_tokens=1024, models=(f"d={deeper}",))
    wrong = derive_finetune(family["base"], str(tmp_path / "wrong"), seed=3, declare_base="other")
    with pytest.raises(UnsupportedModelError, match="declares base 'other'"):
        Engine(family["base"], dtype="float32", max_total_tokens=1024, models=(f"w={wrong}",))


def test_family_over_http(family, family_engine):
    from test_server import start_server
    proc, url = start_server(family["base"], "--served-model-name", "base", "--model", f"ft1={family['ft1']}",
                             "--model", f"ft2={family['ft2']}")
    try:
        models = {m["id"]: m for m in httpx.get(url + "/v1/models").json()["data"]}
        assert set(models) == {"base", "ft1", "ft2"}
        assert models["ft1"]["parent"] == "base" and models["ft2"]["lineage"] == "base"
        ref = family_engine.generate(PROMPTS[0], GREEDY, model="ft2")["output_ids"]
        by_path = httpx.post(url + "/models/ft2/generate", json={"text": PROMPTS[0], "sampling_params": GREEDY})
        by_field = httpx.post(url + "/generate", json={"text": PROMPTS[0], "sampling_params": GREEDY, "model": "ft2"})
        by_lora = httpx.post(url + "/generate", json={"text": PROMPTS[0], "sampling_params": GREEDY,
                                                      "lora_path": "ft2"})
        assert by_path.json()["output_ids"] == by_field.json()["output_ids"] == by_lora.json()["output_ids"] == ref
        chat = httpx.post(url + "/v1/completions", json={"model": "ft1", "prompt": PROMPTS[0], "max_tokens": 4})
        assert chat.status_code == 200 and chat.json()["model"] == "ft1"
        info = httpx.get(url + "/models/ft1/model_info").json()
        assert info["served_model_name"] == "ft1" and info["parent"] == "base"
        from droidspeak.models.identity import fingerprint
        assert info["fingerprint"] == fingerprint(family["ft1"]) != fingerprint(family["base"])
        assert httpx.get(url + "/models/zzz/model_info").status_code == 404
        # A batched call routes each prompt to its own member (by model or lora_path).
        alone = [family_engine.generate(PROMPTS[i], GREEDY, model=m)["output_ids"]
                 for i, m in enumerate(["ft1", "base", "ft2"])]
        mixed = httpx.post(url + "/generate", json={"text": PROMPTS[:3], "sampling_params": GREEDY,
                                                    "model": ["ft1", "base", "ft2"]}).json()
        assert [r["output_ids"] for r in mixed] == alone
        by_lora = httpx.post(url + "/generate", json={"text": PROMPTS[:3], "sampling_params": GREEDY,
                                                      "model": "ft1", "lora_path": [None, "base", "ft2"]}).json()
        assert [r["output_ids"] for r in by_lora] == alone
        short = httpx.post(url + "/generate", json={"text": PROMPTS[:3], "model": ["ft1", "base"]})
        assert short.status_code == 400 and short.json()["error"]["param"] == "model"
        unknown = httpx.post(url + "/generate", json={"text": PROMPTS[:2], "model": ["ft1", "zzz"]})
        assert unknown.status_code == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_max_models_per_batch_and_fairness(family):
    engine = Engine(family["base"], dtype="float32", served_model_name="base", max_total_tokens=4096,
                    models=(f"ft1={family['ft1']}", f"ft2={family['ft2']}"), max_models_per_batch=1,
                    max_running_requests=2)
    seen = []
    original = engine.runner.forward

    def spy(batch, extra_rows=None):
        seen.append(set(batch.model_ids or [0]))
        return original(batch, extra_rows)
    engine.runner.forward = spy
    # a backlog for the base model queued first, then one request for ft1
    jobs = [("base", f"{PROMPTS[0]} {i}") for i in range(8)] + [("ft1", PROMPTS[1])]
    mixed = run_mixed(engine, jobs)
    assert all(len(s) == 1 for s in seen), "a batch held more than one model"
    solo = Engine(family["ft1"], dtype="float32", max_total_tokens=1024).generate(PROMPTS[1], GREEDY)
    assert mixed[-1] == solo["output_ids"]
    # round-robin admission: ft1 runs after at most one base batch, not after all eight
    first_ft1 = next(i for i, s in enumerate(seen) if s == {1})
    assert first_ft1 < len(seen) // 2
    assert_no_leak(engine)


def test_models_file_toml_and_yaml(family, tmp_path):
    """A family described in a TOML or YAML file (relative paths resolved against
    the file) serves the same as flags; bad files are refused naming the problem."""
    import os

    from droidspeak.errors import InvalidRequestError
    from droidspeak.models_file import load_models_file

    rel = os.path.relpath(family["ft2"], tmp_path)
    (tmp_path / "family.toml").write_text(
        f'[base]\nname = "base"\npath = "{family["base"]}"\n[models]\nft1 = "{family["ft1"]}"\n'
        f'ft2 = {{ path = "{rel}" }}\n')
    (tmp_path / "family.yaml").write_text(
        f"base: {{name: base, path: {family['base']}}}\nmodels:\n  ft1: {family['ft1']}\n  ft2: {rel}\n"
        f"remote:\n  elsewhere: 0123abcd\n")
    outs = []
    for name in ("family.toml", "family.yaml"):
        f = load_models_file(str(tmp_path / name))
        assert f.base_name == "base" and f.models == (f"ft1={family['ft1']}", f"ft2={family['ft2']}")
        assert f.remote == (("elsewhere=0123abcd",) if name.endswith(".yaml") else ())
        store = {"kv_store": "ram"} if f.remote else {}  # a remote sender is reused through the store
        engine = Engine(dtype="float32", models_file=str(tmp_path / name), max_total_tokens=1024, **store)
        assert engine.model_names == ["base", "ft1", "ft2"]
        if f.remote:
            assert engine.identity("elsewhere") == "0123abcd"
        outs.append(engine.generate(PROMPTS[0], GREEDY, model="ft2")["output_ids"])
    assert outs[0] == outs[1]
    bad = {"x.toml": "[models]\nft1 = 3\n", "y.toml": "[nope]\n", "z.yaml": "models: [1, 2\n",
           "w.toml": "[base]\nweights = 1\n", "v.json": "{}", "u.toml": "[remote]\nft1 = 3\n"}
    expect = {"x.toml": "non-empty path", "y.toml": "unknown section", "z.yaml": "not valid YAML",
              "w.toml": "only name and path", "v.json": "must end in", "u.toml": "fingerprint"}
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(InvalidRequestError, match=expect[name]):
            load_models_file(str(tmp_path / name))
    with pytest.raises(InvalidRequestError, match="cannot read"):
        load_models_file(str(tmp_path / "missing.toml"))


# Sizes that the AMX and the AVX512-BF16 kernels take (head dim 64, two query
# heads per KV head, every K a multiple of 32), so that decode steps run as the
# decode team on either.
TILE_DIMS = {"hidden_size": 256, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_decode_team_equals_kernel_by_kernel(tmp_path, monkeypatch, arch):
    """On AMX CPUs a decode step's layers (and an extend's of at most 256 rows)
    run in one parallel region, each phase split between the threads
    (csrc/layer_stack.cpp's decode team); a co-batched
    family (several members' rows, one weight row per member in the norms, QKV
    biases for Qwen2) gets bit-identical logprobs from it, from the native call
    run kernel by kernel (DROIDSPEAK_NO_DECODE_TEAM=1) and from the Python layers."""
    from droidspeak import _C
    from droidspeak.models.llama import LlamaForCausalLM
    base = build_tiny_model(str(tmp_path / "base"), arch, seed=3, num_layers=2, dims=TILE_DIMS)
    ft1 = derive_finetune(base, str(tmp_path / "ft1"), seed=4)
    engine = Engine(base, dtype="bfloat16", served_model_name="base", max_total_tokens=4096,
                    models=(f"ft1={ft1}",))
    jobs = [(m, p) for p in PROMPTS for m in ("base", "ft1")] + [("base", "a longer prompt " * 9)]
    long_jobs = [(m, "a long shared document " * 5) for m in ("base", "ft1")]
    params = dict(GREEDY, max_new_tokens=10)
    # the short prompts, then with a few more tokens (short extends over a cached
    # prefix); the long prompts (past one 64-query block), then with 20-odd more
    # tokens (extends past 16 tokens per request: the blocked attention)
    rounds = [(jobs, ""), (jobs, " and more"), (long_jobs, ""), (long_jobs, " with a longer continuation")]

    def run():
        done = []
        for round_jobs, suffix in rounds:
            reqs = []
            for model, prompt in round_jobs:
                r, _ = engine.make_requests(prompt + suffix, params, model=model, return_logprob=True)
                reqs.extend(r)
            for _ in engine._drive(reqs):
                pass
            done.append(reqs)
        assert sum(r.cached_tokens for r in done[1]) > 0
        assert all(r.cached_tokens > 64 and len(r.origin_input_ids) - r.cached_tokens > 16 for r in done[3])
        engine.flush_cache()
        return [(r.output_ids, r.output_token_logprobs) for reqs in done for r in reqs]
    steps = _C.decode_team_steps()
    team = run()
    ran = _C.decode_team_steps() - steps
    # every decode step (9 per round) took the team, and with AMX the extends
    # too, except the first round's (prompts shorter than one query block)
    decode_steps = len(rounds) * (params["max_new_tokens"] - 1)
    if _C.amx_available():
        assert ran == decode_steps + 3
    elif _vector_team_cpu():
        assert ran == decode_steps
    else:
        assert ran == 0
    monkeypatch.setenv("DROIDSPEAK_NO_DECODE_TEAM", "1")
    steps = _C.decode_team_steps()
    assert run() == team
    assert _C.decode_team_steps() == steps
    monkeypatch.setattr(LlamaForCausalLM, "_native_layers", staticmethod(lambda hidden, batch: False))
    assert run() == team
    assert len({tuple(t[0]) for t in team}) > 2  # the members and prompts really differ
    assert_no_leak(engine)
    engine.shutdown()


def _vector_team_cpu() -> bool:
    """Whether this CPU has AVX512-BF16 (the vector kernels' decode team)."""
    with open("/proc/cpuinfo") as f:
        return "avx512_bf16" in f.read()


def test_decode_team_without_amx():
    """Without AMX (and with DROIDSPEAK_NO_AMX=1) the decode team runs the
    AVX512-BF16 kernels' work items: the same comparisons, in a process where the
    tile state is never requested."""
    assert "2 passed" in pytest_without_amx(__file__, "decode_team_equals_kernel_by_kernel")
