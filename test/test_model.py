"""Our model code against transformers' forward on the same weights."""
import pytest
import torch

from droidspeak.config import EngineConfig
from droidspeak.errors import ModelNotFoundError, UnsupportedModelError
from droidspeak.models.config import ModelConfig
from droidspeak.runner.model_runner import ModelRunner
from droidspeak.scheduler.sequence import Sequence
from helpers import build_tiny_model


def prefill_logits(runner: ModelRunner, ids: list[int]) -> torch.Tensor:
    return Sequence(runner).extend(ids)


def hf_logits(path, ids, dtype=torch.float32):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("arch,kwargs", [
    ("llama", {}),
    ("qwen2", {}),
    ("llama", {"tie": False}),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
])
def test_logits_match_transformers_fp32(tmp_path, arch, kwargs):
    path = build_tiny_model(str(tmp_path), arch, **kwargs)
    runner = ModelRunner(EngineConfig(dtype="float32", max_total_tokens=1024, max_running_requests=2), path)
    ids = torch.randint(3, runner.model_config.vocab_size, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = prefill_logits(runner, ids)
    ref = hf_logits(path, ids)
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)


def test_model_config_spellings():
    v4 = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
          "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 5e5,
          "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192},
          "eos_token_id": [1, 2]}
    c = ModelConfig.from_dict(v4)
    assert c.rope_theta == 5e5 and c.rope_scaling["rope_type"] == "llama3"
    assert c.num_kv_heads == 2 and c.head_dim == 4 and c.eos_token_ids == (1, 2)
    v5 = dict(v4, rope_scaling=None, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    c = ModelConfig.from_dict(v5)
    assert c.rope_theta == 1e4 and c.rope_scaling is None


def test_bad_models_are_clear_errors(tmp_path):
    with pytest.raises(UnsupportedModelError, match="supported: LlamaForCausalLM, Qwen2ForCausalLM"):
        ModelConfig.from_dict({"architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        from droidspeak.models.default_model import resolve_model_path
        resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        ModelConfig.from_dir(str(tmp_path))


def test_checkpoint_with_missing_tensor_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    path = build_tiny_model(str(tmp_path), "llama", num_layers=2)
    weights = load_file(f"{path}/model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, f"{path}/model.safetensors")
    with pytest.raises(UnsupportedModelError, match="layers.1.mlp.gate_up_proj.weight"):
        ModelRunner(EngineConfig(dtype="float32", max_total_tokens=256), path)


@pytest.mark.slow
def test_default_model_greedy_matches_transformers_fp32(default_model_path):
    from transformers import AutoModelForCausalLM
    from droidspeak import Engine
    engine = Engine(None, dtype="float32", max_total_tokens=8192)
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
    outs = engine.generate(prompts, {"temperature": 0, "max_new_tokens": 32, "min_new_tokens": 32})
    hf = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32)
    for prompt, out in zip(prompts, outs):
        ids = engine.tokenize(prompt)
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
        assert out["output_ids"] == ref[0, len(ids):].tolist()


@pytest.mark.slow
def test_default_model_bf16_logits_close_to_transformers_bf16(default_model_path):
    """Stated bf16 tolerance (logits of magnitude ~30): against transformers bf16,
    max |diff| <= 2.0, mean |diff| <= 0.2, same top-1 at >= 97% of positions; and our
    bf16 error against fp32 is no larger than 1.1x transformers' own bf16 error."""
    runner = ModelRunner(EngineConfig(dtype="bfloat16", max_total_tokens=2048), default_model_path)
    from droidspeak.tokenizer.tokenizer import load_tokenizer
    tok = load_tokenizer(default_model_path)
    ids = tok.encode("Key-value caches store attention keys and values for every token so that "
                     "a model does not recompute them when it generates the next token. " * 4)
    ours = prefill_logits(runner, ids)
    ref16 = hf_logits(default_model_path, ids, torch.bfloat16)
    ref32 = hf_logits(default_model_path, ids, torch.float32)
    diff = (ours - ref16).abs()
    assert diff.max() <= 2.0 and diff.mean() <= 0.2, (diff.max(), diff.mean())
    assert (ours.argmax(-1) == ref16.argmax(-1)).float().mean() >= 0.97
    assert (ours - ref32).abs().mean() <= 1.1 * (ref16 - ref32).abs().mean()


@pytest.mark.parametrize("dims", [
    {"hidden_size": 192, "num_attention_heads": 3, "num_key_value_heads": 1},  # head dim 64, 3 per KV head
    {"hidden_size": 256, "num_attention_heads": 2, "num_key_value_heads": 1},  # head dim 128, 2 per KV head
])
def test_bf16_decode_matches_a_prefill_of_the_same_tokens(tmp_path, dims):
    """Each bf16 decode step's logprob of the token it picked against one prefill
    over the prompt and every generated token (decode attention's register-tiled
    kernel against the extend path): the same greedy tokens, logprobs within
    bf16 rounding (measured max 0.13, mean 0.03). On any CPU: the decode kernel
    counts its vectors by the CPU's width (on AVX2 a 16-lane assumption once read
    half of each head)."""
    from droidspeak import Engine
    engine = Engine(build_tiny_model(str(tmp_path), dims=dims), dtype="bfloat16", max_total_tokens=2048)
    prompts = ["The quick brown fox", "def add(a, b):", "Radix trees share prefixes " * 6]
    outs = engine.generate(prompts, {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True},
                           return_logprob=True)
    for prompt, out in zip(prompts, outs):
        ids = engine.tokenize(prompt)
        seq = Sequence(engine.runner)
        logp = torch.log_softmax(seq.extend(ids + out["output_ids"]), -1)
        seq.release()
        steps = logp[len(ids) - 1:-1]
        decoded = torch.tensor([entry[0] for entry in out["meta_info"]["output_token_logprobs"]])
        tokens = torch.tensor(out["output_ids"])
        picked = steps.gather(1, tokens[:, None])[:, 0]
        assert (steps.argmax(-1) == tokens).float().mean() >= 0.9
        diff = (decoded - picked).abs()  # this random model's logits reach ~+-10
        assert diff.max() <= 0.5 and diff.mean() <= 0.1, diff
    engine.shutdown()


@pytest.mark.parametrize("arch,max_rows", [("qwen2", 32), ("llama", 0)])
def test_native_layers_equal_layer_by_layer(tmp_path, monkeypatch, arch, max_rows):
    """One model's bf16 forwards (prefill, extends over a cached prefix, decode
    steps) in one native call vs layer by layer: the same tokens and bit-identical
    logprobs, with QKV biases (Qwen2), and with the rows past the grouped kernel's
    (max_rows=0: torch's matmul inside the call)."""
    from droidspeak import Engine, kernels
    from droidspeak.models.llama import LlamaForCausalLM
    monkeypatch.setattr(kernels, "GROUPED_KERNEL_MAX_ROWS", max_rows)
    engine = Engine(build_tiny_model(str(tmp_path), arch), dtype="bfloat16", max_total_tokens=2048)
    prompts = ["The quick brown fox", "def add(a, b):", "Radix trees"]
    params = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}

    def run():
        engine.flush_cache()
        outs = engine.generate(prompts, params, return_logprob=True, logprob_start_len=0)
        # these hit the cache (input logprobs from 0 would need the whole prompt run)
        outs += engine.generate([p + " share prefixes" for p in prompts], params, return_logprob=True)
        assert sum(o["meta_info"]["cached_tokens"] for o in outs) > 0
        return [(o["output_ids"], o["meta_info"]["output_token_logprobs"],
                 o["meta_info"]["input_token_logprobs"]) for o in outs]
    calls = []
    stack = LlamaForCausalLM._layer_stack
    monkeypatch.setattr(LlamaForCausalLM, "_layer_stack", lambda self, *a: calls.append(1) or stack(self, *a))
    native = run()
    assert len(calls) == 2 * params["max_new_tokens"]  # every forward (1 prefill + 11 decode steps, twice)
    monkeypatch.setattr(LlamaForCausalLM, "_native_layers", staticmethod(lambda hidden, batch: False))
    assert run() == native
    engine.shutdown()
