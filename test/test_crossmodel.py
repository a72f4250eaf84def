"""Cross-model KV reuse (DroidSpeak) on a tiny family: selective recompute against
its references, the E cache, shared slots, the policy and profile files."""
import dataclasses
import json
import logging
import os
import time

import pytest
import torch

from droidspeak import Engine
from droidspeak.crossmodel.policy import PairStats
from droidspeak.errors import InvalidRequestError, ModelNotFoundError
from droidspeak.crossmodel.profile import GroupScore, Profile, ProfileError, profile_path
from droidspeak.crossmodel.profiler import Encoded, Profiler
from droidspeak.models.identity import fingerprint
from droidspeak.runner.batch import recompute_start
from droidspeak.scheduler.sequence import Sequence
from helpers import build_lora_adapter, build_tiny_model, derive_finetune, record_fetches
from conftest import assert_no_leak

NUM_LAYERS = 6
CONTEXT = ("Radix trees share prefixes between requests, and a family of fine-tunes shares "
           "one base model, so the context read by one model can be reused by another. ")
QUESTIONS = ["What do radix trees share?", "Which models share a base?"]


def write_profile(directory, paths, sender, receiver, target, wholesale_ok=False, tail=1.0):
    """A profile whose smallest group within 1% of full prefill is `target`
    (recomputed over the last `tail` share of the reused span)."""
    full = GroupScore(0, NUM_LAYERS, soft_ce=1.0, ce=1.0, kl=0.0, agreement=1.0)
    groups = [GroupScore(0, 0, soft_ce=1.0 if wholesale_ok else 1.5, ce=1.2, kl=0.1, agreement=0.8), full,
              GroupScore(target[0], target[1], soft_ce=1.005, ce=1.0, kl=0.005, agreement=0.99, tail=tail)]
    p = Profile(sender, receiver, NUM_LAYERS, 2, full, groups,
                fingerprint(paths[sender]), fingerprint(paths[receiver]))
    p.save(profile_path(directory, sender, receiver))


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("xfamily")
    base = build_tiny_model(str(root / "base"), "llama", seed=0, num_layers=NUM_LAYERS)
    paths = {"base": base,
             "a": derive_finetune(base, str(root / "a"), seed=1, scale=0.2),
             "b": derive_finetune(base, str(root / "b"), seed=2, scale=0.2),
             "la": build_lora_adapter(base, str(root / "la"), seed=3)}
    profiles = str(root / "profiles")
    os.makedirs(profiles)
    write_profile(profiles, paths, "a", "b", (2, 4))
    write_profile(profiles, paths, "b", "a", (2, 2), wholesale_ok=True)
    write_profile(profiles, paths, "a", "la", (0, 2))
    write_profile(profiles, paths, "b", "la", (0, NUM_LAYERS), tail=0.5)
    return paths, profiles


def make_engine(family, **kw):
    paths, profiles = family
    return Engine(paths["base"], served_model_name="base",
                  models=(f"a={paths['a']}", f"b={paths['b']}"), lora_paths=(f"la={paths['la']}",),
                  cross_model_profiles=profiles, **{"dtype": "float32", "max_total_tokens": 4096, **kw})


@pytest.fixture(scope="module")
def engine(family):
    return make_engine(family)


def ids_of(engine, text):
    return engine.tokenizer.encode(text, add_special_tokens=False)


def run(engine, model, ids, ctx_len, **kw):
    """One request; input logprobs from the token after the context on."""
    return engine.generate(input_ids=ids, model=model, return_logprob=True, logprob_start_len=ctx_len + 1,
                           sampling_params={"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}, **kw)


def reference_logprobs(engine, sender, receiver, ids, ctx_len, group, tail=1.0):
    """Receiver's input logprobs over ids[ctx_len + 1:] when it reuses the sender's
    context KV with `group` recomputed (None: its own full prefill), on Sequences."""
    runner = engine.runner
    s, r = engine.resolve(sender), engine.resolve(receiver)
    seqs = [Sequence(runner), Sequence(runner)]
    try:
        if group is None:
            seqs[1].extend(ids[:ctx_len], r.model_id, r.lora_id)
        else:
            seqs[0].extend(ids[:ctx_len], s.model_id, s.lora_id, keep_e=True)
            seqs[1].reuse(seqs[0], ctx_len, group, r.model_id, r.lora_id, tail=tail)
        logits = seqs[1].extend(ids[ctx_len:], r.model_id, r.lora_id)[:-1]
    finally:
        for seq in seqs:
            seq.release()
    targets = torch.tensor(ids[ctx_len + 1:])
    return torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)


def engine_logprobs(out):
    return torch.tensor([lp for lp, _ in out["meta_info"]["input_token_logprobs"]])


def test_policy_layout_from_profiles(engine):
    policy = engine.cross_policy
    assert engine.runner.kv_pool.segments.bounds == (0, 2, 4, 6)
    assert policy.layout.e_layers == (2,)  # a -> b starts at 2; a -> la starts at 0 (own embeddings)
    assert engine.runner.allocator.num_spaces == 3
    assert policy.group(engine.resolve("a").cache_namespace, engine.resolve("b").cache_namespace, False, 10) == (2, 4)


def test_full_group_equals_own_prefill(engine):
    """Recomputing every layer runs as the head of the receiver's extend: one pass
    over the whole prompt, bit for bit the receiver's own served prefill."""
    engine.flush_cache()
    ids = ids_of(engine, CONTEXT + QUESTIONS[0])
    ctx = len(ids_of(engine, CONTEXT))
    own = engine_logprobs(run(engine, "b", ids, ctx))
    recomputed = reference_logprobs(engine, "a", "b", ids, ctx, (0, NUM_LAYERS))
    assert torch.equal(own, recomputed)


def test_empty_group_equals_wholesale_reuse_through_engine(engine):
    """b -> a's profile says wholesale reuse is good enough: the engine reuses b's
    KV in every layer, exactly as a hand-made wholesale reuse does."""
    engine.flush_cache()
    ids = ids_of(engine, CONTEXT + QUESTIONS[0])
    ctx = len(ids_of(engine, CONTEXT))
    run(engine, "b", ids_of(engine, CONTEXT + QUESTIONS[1]), ctx)
    out = run(engine, "a", ids, ctx)
    assert out["meta_info"]["cross_model_cached_tokens"] == ctx
    wholesale = reference_logprobs(engine, "b", "a", ids, ctx, (2, 2))
    own = reference_logprobs(engine, "b", "a", ids, ctx, None)
    assert torch.allclose(engine_logprobs(out), wholesale, atol=1e-5)
    assert not torch.allclose(wholesale, own, atol=1e-3)  # reuse really changed something
    assert_no_leak(engine)


@pytest.mark.parametrize("sender,receiver,group,tail", [("a", "b", (2, 4), 1.0), ("a", "la", (0, 2), 1.0),
                                                       ("b", "la", (0, NUM_LAYERS), 0.5)])
def test_cross_hit_recomputes_the_group(engine, sender, receiver, group, tail, monkeypatch):
    engine.flush_cache()
    ids = ids_of(engine, CONTEXT + QUESTIONS[0])
    ctx = len(ids_of(engine, CONTEXT))
    first = run(engine, sender, ids_of(engine, CONTEXT + QUESTIONS[1]), ctx)
    assert first["meta_info"]["cached_tokens"] == 0
    runner, batches = engine.runner, []
    forward = runner.forward
    before = dataclasses.replace(engine.cross_policy.stats.get((sender, receiver), PairStats()))
    monkeypatch.setattr(runner, "forward", lambda batch, *a: batches.append(batch) or forward(batch, *a))
    out = run(engine, receiver, ids, ctx)
    monkeypatch.undo()
    # A group of every layer from the receiver's embeddings runs as the head of its
    # own extend (one pass); any other group runs before it, separately.
    prefill = batches[0]
    fused = group == (0, NUM_LAYERS)
    assert [len(prefill.recompute), len(prefill.fused_recompute)] == ([0, 1] if fused else [1, 0])
    job = (prefill.fused_recompute or prefill.recompute)[0]
    # a tail recompute also runs the attention sink (token 0), as a KV-only request of the same pass
    sink = [1] if tail < 1 else []
    assert prefill.extend_lens == [len(ids) - (job.start if fused else ctx)] + sink
    assert prefill.kv_only == len(sink) and (job.sink is not None) == bool(sink)
    assert out["meta_info"]["cached_tokens"] == ctx and out["meta_info"]["cross_model_cached_tokens"] == ctx
    expected = reference_logprobs(engine, sender, receiver, ids, ctx, group, tail)
    assert torch.allclose(engine_logprobs(out), expected, atol=1e-5)
    wholesale = reference_logprobs(engine, sender, receiver, ids, ctx, (group[0], group[0]))
    assert not torch.allclose(expected, wholesale, atol=1e-3)
    if tail < 1:  # recomputing only the last half is not the receiver's own prefill either
        own = reference_logprobs(engine, sender, receiver, ids, ctx, None)
        assert not torch.allclose(expected, own, atol=1e-3)
    # The receiver's entry is now its own: its next request is an exact hit.
    again = run(engine, receiver, ids, ctx)
    assert again["meta_info"]["cached_tokens"] == ctx and again["meta_info"]["cross_model_cached_tokens"] == 0
    assert torch.allclose(engine_logprobs(again), expected, atol=1e-5)
    # the hit's counters: its recomputed (token, layer) pairs are the job's tokens and sink
    stats = engine.cross_policy.stats[(sender, receiver)]
    assert stats.hits == before.hits + 1 and stats.tokens == before.tokens + ctx
    assert stats.token_layers_recomputed - before.token_layers_recomputed == \
        (job.end - job.start + len(sink)) * (group[1] - group[0])
    assert_no_leak(engine)


@pytest.mark.parametrize("sender,receiver,group,tail", [("a", "b", (2, 4), 1.0), ("a", "la", (0, 2), 1.0),
                                                       ("b", "la", (0, NUM_LAYERS), 0.5), ("b", "a", (2, 2), 1.0)])
def test_served_hit_equals_the_profilers_measurement_bit_for_bit(engine, sender, receiver, group, tail):
    """The profiler scores exactly the code path a served request runs: the same
    plan, lease, recompute job, batch and runner calls give the same bits."""
    engine.flush_cache()
    ids = ids_of(engine, CONTEXT + QUESTIONS[0])
    ctx = len(ids_of(engine, CONTEXT))
    run(engine, sender, ids[:ctx], ctx)  # the sender prefills the context alone, as the profiler's does
    out = run(engine, receiver, ids, ctx)
    assert out["meta_info"]["cross_model_cached_tokens"] == ctx
    s, r = engine.resolve(sender), engine.resolve(receiver)
    sender_seq = Sequence(engine.runner)
    try:
        sender_seq.extend(ids[:ctx], s.model_id, s.lora_id, keep_e=True)
        enc = Encoded(ids[:ctx], ids[ctx:], len(ids) - ctx - 1, range(0))
        logits = Profiler(engine, [])._suffix_logits(sender_seq, enc, (*group, tail), r)
    finally:
        sender_seq.release()
    profiled = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[ctx + 1:])[:, None]).squeeze(1)
    assert torch.equal(engine_logprobs(out), profiled)
    assert_no_leak(engine)


def test_e_cache_equals_sender_hidden_state(engine):
    engine.flush_cache()
    ids = ids_of(engine, CONTEXT + QUESTIONS[0])
    run(engine, "a", ids, 0)
    node = engine.scheduler.cache.match_prefix(ids[:-1], engine.resolve("a").cache_namespace).last_node
    chain = []
    while node is not engine.scheduler.cache.root:
        chain.append(node.entries[engine.resolve("a").cache_namespace])
        node = node.parent
    erows = torch.cat([e.erows for e in reversed(chain)], dim=1)[0]
    stored = engine.runner.e_pool.rows(2, erows)
    # The stream entering layer 2 of model a, computed independently.
    model = engine.runner.models[engine.resolve("a").model_id]
    captured = []
    hook = model.layers[2].register_forward_pre_hook(lambda m, args: captured.append(args[0].clone()))
    seq = Sequence(engine.runner)
    try:
        seq.extend(ids, engine.resolve("a").model_id)
    finally:
        hook.remove()
        seq.release()
    assert torch.equal(stored, captured[0][:stored.shape[0]])
    assert stored.shape[0] >= len(ids) - 1


def test_native_layers_keep_the_e_cache_as_the_python_layers(family, monkeypatch):
    """In bf16 a sender's forwards keep the E cache inside the native layer call
    (csrc/layer_stack.cpp); receivers' cross-model hits then recompute from it.
    Against layer by layer: the same tokens and logprobs, and the same E cache."""
    from droidspeak.models.llama import LlamaForCausalLM
    engine = make_engine(family, dtype="bfloat16")
    ctx = len(ids_of(engine, CONTEXT))

    def hand_off():
        engine.flush_cache()
        outs = [run(engine, "a", ids_of(engine, CONTEXT + QUESTIONS[1]), ctx)]
        outs += [run(engine, m, ids_of(engine, CONTEXT + QUESTIONS[0]), ctx) for m in ("b", "la")]
        assert [o["meta_info"]["cross_model_cached_tokens"] for o in outs] == [0, ctx, ctx]
        return ([(o["output_ids"], o["meta_info"]["output_token_logprobs"],
                  o["meta_info"]["input_token_logprobs"]) for o in outs],
                engine.runner.e_pool.h.view(torch.int16).clone())  # bitwise: unused rows may hold NaNs
    calls = []
    stack = LlamaForCausalLM._layer_stack
    monkeypatch.setattr(LlamaForCausalLM, "_layer_stack", lambda self, *a: calls.append(1) or stack(self, *a))
    native, e_native = hand_off()
    assert calls
    monkeypatch.setattr(LlamaForCausalLM, "_native_layers", staticmethod(lambda hidden, batch: False))
    python, e_python = hand_off()
    assert native == python
    assert torch.equal(e_native, e_python)
    assert_no_leak(engine)


def test_tail_recompute_owns_the_attention_sink(engine):
    """b -> la recomputes every layer over the last half of the context, and the
    context's first token too: the receiver's entry owns that token's slots
    (holding exactly its own prefill's KV of it) and shares the sender's between."""
    engine.flush_cache()
    ids = ids_of(engine, CONTEXT + QUESTIONS[0])
    ctx = len(ids_of(engine, CONTEXT))
    run(engine, "b", ids_of(engine, CONTEXT + QUESTIONS[1]), ctx)
    run(engine, "la", ids, ctx)
    cache, runner = engine.scheduler.cache, engine.runner
    b, la = engine.resolve("b"), engine.resolve("la")
    sender = cache.match_prefix(ids[:ctx], b.cache_namespace).indices
    receiver = cache.match_prefix(ids[:ctx], la.cache_namespace).indices
    first = recompute_start(0, ctx, 0.5)
    assert not bool((sender[:, 0] == receiver[:, 0]).any())  # the sink: the receiver's own
    assert torch.equal(sender[:, 1:first], receiver[:, 1:first])  # shared up to the tail
    assert not bool((sender[:, first:] == receiver[:, first:]).any())
    assert int(runner.allocator.refs[0, receiver[0, 0]]) == 1
    own = Sequence(runner)
    try:
        own.extend(ids[:1], la.model_id, la.lora_id)
        kv_own = own.kv_tensors(1)
    finally:
        own.release()
    pool = runner.kv_pool
    torch.testing.assert_close(pool.gather(receiver[:, :1]), kv_own, rtol=0, atol=1e-5)
    half = pool.channels // 2  # K, then V
    for layer in range(NUM_LAYERS):
        assert not torch.allclose(pool.gather(sender[:, :1])[layer, 0, :half], kv_own[layer, 0, :half], atol=1e-3)
    assert_no_leak(engine)


@pytest.fixture(scope="module")
def tail_family(tmp_path_factory, family):
    """The same models with tail profiles only: the KV layout is one segment, so a
    receiver's recomputed tokens (tail and sink) free slots in every segment."""
    paths, _ = family
    profiles = str(tmp_path_factory.mktemp("tail_profiles"))
    write_profile(profiles, paths, "b", "la", (0, NUM_LAYERS), tail=0.5)
    write_profile(profiles, paths, "b", "a", (0, NUM_LAYERS), tail=0.25)
    return paths, profiles


def test_tail_hits_chunked_equal_unchunked_with_exact_accounting(tail_family):
    """A tail + sink hit prefilled in chunks of 8 gives the unchunked hit's outputs,
    and the tree's evictable size counts every slot its receivers own (with one
    segment, free + evictable is the whole pool)."""
    outs = {}
    for chunk in (None, 8):
        e = make_engine(tail_family, **({} if chunk is None else {"chunked_prefill_size": chunk}))
        assert e.runner.allocator.num_spaces == 1
        ids = ids_of(e, CONTEXT + QUESTIONS[0])
        ctx = len(ids_of(e, CONTEXT))
        for receiver in ("la", "a"):
            e.flush_cache()
            run(e, "b", ids_of(e, CONTEXT + QUESTIONS[1]), ctx)
            out = run(e, receiver, ids, ctx)
            assert out["meta_info"]["cross_model_cached_tokens"] == ctx
            outs[chunk, receiver] = (engine_logprobs(out), out["output_ids"])
            assert_no_leak(e)
        e.shutdown()
    for receiver in ("la", "a"):
        assert outs[None, receiver][1] == outs[8, receiver][1]
        assert torch.allclose(outs[None, receiver][0], outs[8, receiver][0], atol=1e-4)


def test_receiver_shares_sender_slots_outside_the_group(engine):
    engine.flush_cache()
    ids = ids_of(engine, CONTEXT + QUESTIONS[0])
    ctx = len(ids_of(engine, CONTEXT))
    run(engine, "a", ids_of(engine, CONTEXT + QUESTIONS[1]), ctx)
    alloc = engine.runner.allocator
    before = list(alloc._count)
    run(engine, "b", ids, ctx)
    cache, a, b = engine.scheduler.cache, engine.resolve("a").cache_namespace, engine.resolve("b").cache_namespace
    node = cache.match_prefix(ids[:ctx], b).last_node
    entry_a, entry_b = node.entries[a], node.entries[b]
    assert torch.equal(entry_a.slots[0], entry_b.slots[0]) and torch.equal(entry_a.slots[2], entry_b.slots[2])
    assert not torch.equal(entry_a.slots[1], entry_b.slots[1])  # segment [2, 4) was recomputed
    assert int(alloc.refs[0, entry_a.slots[0]].min()) == 2
    used = [x - y for x, y in zip(before, alloc._count)]
    suffix = len(ids) - ctx + 4  # b's own question and output tokens take every segment
    assert used[1] - used[0] >= ctx - 1 and used[0] <= suffix
    assert_no_leak(engine)


def test_pressure_eviction_with_shared_slots(family):
    """A pool that holds two contexts: senders and receivers alternate over many
    contexts, the tree evicts entries that share slots, nothing leaks."""
    small = make_engine(family, max_total_tokens=300)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    for i, w in enumerate(words):
        context = f"Context {i}: {w} " * 4
        ctx = len(ids_of(small, context))
        run(small, "a", ids_of(small, context + QUESTIONS[0]), ctx)
        out = run(small, "b", ids_of(small, context + QUESTIONS[1]), ctx)
        assert out["meta_info"]["cross_model_cached_tokens"] > 0
        run(small, "la", ids_of(small, context + QUESTIONS[1]), ctx)
        assert_no_leak(small)
    small.scheduler.cache.evict(1 << 30)
    assert small.runner.allocator.num_referenced == 0 and small.runner.e_allocator.num_referenced == 0
    assert small.runner.allocator.available_size == 300


def test_pair_without_profile_prefills_in_full(engine, caplog):
    engine.flush_cache()
    ids = ids_of(engine, CONTEXT + QUESTIONS[0])
    ctx = len(ids_of(engine, CONTEXT))
    run(engine, "base", ids_of(engine, CONTEXT + QUESTIONS[1]), ctx)
    with caplog.at_level(logging.INFO, logger="droidspeak.crossmodel.policy"):
        out = run(engine, "b", ids, ctx)
    assert out["meta_info"]["cached_tokens"] == 0
    assert torch.allclose(engine_logprobs(out), reference_logprobs(engine, "a", "b", ids, ctx, None), atol=1e-5)
    assert "droidspeak profile --sender base --receiver b" in caplog.text


def test_disable_cross_model(family):
    eng = make_engine(family, disable_cross_model=True)
    assert eng.runner.allocator.num_spaces == 1 and eng.runner.e_pool is None
    ids = ids_of(eng, CONTEXT + QUESTIONS[0])
    ctx = len(ids_of(eng, CONTEXT))
    run(eng, "a", ids, ctx)
    assert run(eng, "b", ids, ctx)["meta_info"]["cached_tokens"] == 0


def test_profile_files_are_validated(tmp_path, family):
    paths, profiles = family
    good = json.load(open(profile_path(profiles, "a", "b")))
    assert Profile.from_json(good).frontier[0].layers == 0
    cases = {"format": "pickle", "version": 99, "num_layers": "30", "groups": []}
    for key, value in cases.items():
        with pytest.raises(ProfileError, match=key if key != "format" else "not a droidspeak profile"):
            Profile.from_json(dict(good, **{key: value}))
    bad_group = dict(good, groups=[dict(good["groups"][0], end=NUM_LAYERS + 1)])
    with pytest.raises(ProfileError, match=r"groups\[0\]"):
        Profile.from_json(bad_group)
    nan = dict(good, groups=[dict(good["groups"][0], ce=float("nan"))])
    with pytest.raises(ProfileError, match="ce"):
        Profile.from_json(nan)
    bad_items = dict(good, groups=[dict(good["groups"][0], soft_ce_items=[1.0, "x"])])
    with pytest.raises(ProfileError, match="soft_ce_items"):
        Profile.from_json(bad_items)
    (tmp_path / "x.json").write_bytes(b"\x80not json")
    with pytest.raises(ProfileError, match="cannot read"):
        Profile.load(str(tmp_path / "x.json"))


def test_quality_target_counts_the_profile_spread():
    """A group meets the target only with one standard error of margin over the
    calibration contexts: a mean just inside 1% with a wide spread does not."""
    full = GroupScore(0, 4, 1.0, 1.0, 0.0, 1.0, soft_ce_items=(1.0, 1.0, 1.0, 1.0))
    steady = GroupScore(1, 2, 1.009, 1.0, 0.01, 0.9, soft_ce_items=(1.009,) * 4)
    spread = GroupScore(0, 1, 1.009, 1.0, 0.01, 0.9, soft_ce_items=(1.0, 1.018, 1.0, 1.018))
    profile = Profile("a", "b", 4, 1, full, [full, steady, spread])
    assert profile.excess(spread) == pytest.approx(profile.excess(steady)) == pytest.approx(0.009)
    assert profile.excess_se(steady) == 0 and profile.excess_se(spread) == pytest.approx(0.005196, rel=1e-3)
    assert profile.meets(steady, 0.01) and not profile.meets(spread, 0.01) and profile.meets(spread, 0.02)
    legacy = GroupScore(0, 1, 1.009, 1.0, 0.01, 0.9)  # profiles written before per-context values
    assert Profile("a", "b", 4, 1, full, [full, legacy]).meets(legacy, 0.01)


def test_stale_profile_is_ignored(tmp_path, family, caplog):
    paths, _ = family
    write_profile(str(tmp_path), {**paths, "a": paths["b"]}, "a", "b", (2, 4))  # made for other weights
    with caplog.at_level(logging.WARNING, logger="droidspeak.crossmodel.policy"):
        eng = make_engine((paths, str(tmp_path)))
    assert eng.cross_policy.choices == {} and "other weights of a" in caplog.text


def test_profiler_end_to_end_and_resume(tmp_path, family):
    """`droidspeak profile` on the tiny family: writes a valid profile and plot per
    pair, the full-prefill group scores perfectly, an interrupted run resumes,
    and an engine picks the profiles up."""
    from droidspeak.cli import main
    from droidspeak.crossmodel.calibration import Item
    from droidspeak.crossmodel.profiler import DEFAULT_TAILS, Profiler, grid_layout

    paths, _ = family
    out = tmp_path / "profiles"
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps(d) for d in [
        {"context": CONTEXT, "question": QUESTIONS[0]},
        {"context": CONTEXT * 2, "question": "Question: 2 + 3?\nAnswer:", "answer": " 5"}]))
    rc = main(["profile", "--model-path", paths["base"], "--served-model-name", "base", "--model", f"a={paths['a']}",
               "--model", f"b={paths['b']}", "--dtype", "float32", "--sender", "a", "--receiver", "b",
               "--calibration", str(calib), "--context-tokens", "80", "--generate-tokens", "3", "--out", str(out)])
    assert rc == 0
    profile = Profile.load(str(out / "a__b.json"))
    assert (out / "a__b.png").stat().st_size > 1000
    full = next(g for g in profile.groups if (g.start, g.end) == (0, NUM_LAYERS))
    assert full.kl == 0 and full.agreement == 1 and full.ce == profile.full.ce
    assert profile.excess(full) == 0 and profile.excess(next(g for g in profile.groups if g.layers == 0)) > 0
    wholesale = next(g for g in profile.groups if g.layers == 0)
    # wholesale, 6 groups of a 3-point grid, and every layer over each default tail share
    assert wholesale.kl > 0 and len(profile.groups) == 1 + 6 + len(DEFAULT_TAILS)
    assert profile.calibration["items"] == 2 and full.task in (0.0, 1.0)
    for g in profile.groups:  # the metric per context, whose mean is the group's value
        assert len(g.soft_ce_items) == 2 and sum(g.soft_ce_items) / 2 == pytest.approx(g.soft_ce)

    # Resume: a run that stopped after the first context does only the second.
    engine = Engine(paths["base"], dtype="float32", served_model_name="base", models=(f"a={paths['a']}",),
                    kv_layout=grid_layout(NUM_LAYERS, 2), disable_cross_model=True, max_total_tokens=2048)
    items = [Item(CONTEXT, QUESTIONS[0]), Item(CONTEXT, QUESTIONS[1])]
    profiler = Profiler(engine, items, step=2, context_tokens=60, generate_tokens=2)
    calls = []
    original = profiler._profile_item

    def stop_after_one(*args):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return original(*args)
    profiler._profile_item = stop_after_one
    with pytest.raises(KeyboardInterrupt):
        profiler.profile_pair("base", "a", str(tmp_path / "p2"), progress=False)
    profiler._profile_item = lambda *args: calls.append(2) or original(*args)
    resumed = profiler.profile_pair("base", "a", str(tmp_path / "p2"), progress=False)
    assert calls == [1, 2]
    fresh = Profiler(engine, items, step=2, context_tokens=60, generate_tokens=2).profile_pair(
        "base", "a", str(tmp_path / "p3"), progress=False)
    assert [g.soft_ce for g in resumed.groups] == pytest.approx([g.soft_ce for g in fresh.groups])
    assert [g.soft_ce_items for g in resumed.groups] == [pytest.approx(g.soft_ce_items) for g in fresh.groups]

    # The engine reads what the profiler wrote (fingerprints match).
    eng = Engine(paths["base"], dtype="float32", served_model_name="base",
                 models=(f"a={paths['a']}", f"b={paths['b']}"), cross_model_profiles=str(out), max_total_tokens=2048,
                 cross_model_quality=0.5)
    assert ("a", "b") in eng.cross_policy.choices


def test_idle_engine_recomputes_more_within_its_ttft_budget(family):
    """a -> la: target [0, 2); with nothing queued and a generous TTFT budget the
    policy takes the best group with the same start, here all layers (exact)."""
    eng = make_engine(family, cross_model_idle_ttft_ms=60_000)
    a, la = eng.resolve("a").cache_namespace, eng.resolve("la").cache_namespace
    assert eng.cross_policy.group(a, la, idle=True, tokens=50) == (0, 2)  # no cost measured yet
    ids = ids_of(eng, CONTEXT + QUESTIONS[0])
    ctx = len(ids_of(eng, CONTEXT))
    run(eng, "a", ids_of(eng, CONTEXT + QUESTIONS[1]), ctx)
    assert eng.cross_policy.group(a, la, idle=True, tokens=50) == (0, NUM_LAYERS)
    assert eng.cross_policy.group(a, la, idle=False, tokens=50) == (0, 2)
    out = run(eng, "la", ids, ctx)
    assert out["meta_info"]["cross_model_cached_tokens"] == ctx
    own = reference_logprobs(eng, "a", "la", ids, ctx, None)
    assert torch.allclose(engine_logprobs(out), own, atol=1e-5)  # all layers recomputed: its own prefill
    tight = make_engine(family, cross_model_idle_ttft_ms=1e-6)
    run(tight, "a", ids_of(tight, CONTEXT + QUESTIONS[1]), ctx)
    assert tight.cross_policy.group(a, la, idle=True, tokens=50) == (0, 2)


def test_server_reports_cross_model_hits(family):
    import signal

    import httpx
    from test_server import start_server

    paths, profiles = family
    proc, url = start_server(paths["base"], "--model", f"a={paths['a']}", "--model", f"b={paths['b']}",
                             "--lora-paths", f"la={paths['la']}", "--cross-model-profiles", profiles)
    try:
        params = {"temperature": 0, "max_new_tokens": 3}
        httpx.post(url + "/generate", json={"text": CONTEXT + QUESTIONS[0], "model": "a",
                                            "sampling_params": params}, timeout=60).raise_for_status()
        out = httpx.post(url + "/v1/completions", json={"model": "b", "prompt": CONTEXT + QUESTIONS[1],
                                                        "max_tokens": 3, "temperature": 0}, timeout=60).json()
        assert out["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        httpx.post(url + "/generate", json={"text": "unrelated prompt", "model": "la", "sampling_params": params},
                   timeout=60).raise_for_status()
        metrics = httpx.get(url + "/metrics").text
        assert 'droidspeak_cross_model_hits_total{receiver="b",sender="a"} 1.0' in metrics
        assert 'droidspeak_cross_model_recomputed_layers_total{receiver="b",sender="a"} 2.0' in metrics
        # per-model series are labelled with the model or adapter that served the request
        for name in ("a", "b", "la"):
            assert f'droidspeak_requests_total{{finish_reason="length",model_name="{name}"}} 1.0' in metrics
        info = httpx.get(url + "/server_info").json()
        pair = next(p for p in info["cross_model_pairs"] if (p["sender"], p["receiver"]) == ("a", "b"))
        assert pair["recompute_layers"] == [2, 4] and pair["hits"] == 1 and pair["reused_tokens"] > 0
        # layers [2, 4) over the whole reused prompt (a group from the E cache has no tail)
        assert pair["recomputed_token_layers"] == 2 * pair["reused_tokens"]
        assert (f'droidspeak_cross_model_recomputed_token_layers_total{{receiver="b",sender="a"}} '
                f'{2.0 * pair["reused_tokens"]}') in metrics
        reloaded = httpx.post(url + "/reload_cross_model_profiles").json()["cross_model_pairs"]
        by_pair = {(p["sender"], p["receiver"]): p for p in reloaded}
        assert by_pair[("a", "b")]["status"] == "profiled" and by_pair[("a", "b")]["hits"] == 1
        assert by_pair[("tiny", "a")]["status"] == "missing"  # the root is served as "tiny"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_profiles_and_adapters_join_while_serving(family, tmp_path):
    """Profiles made after start, and adapters loaded after it, join the policy
    where their group fits the running KV layout; every pair reports its status."""
    paths, _ = family
    live = str(tmp_path / "live")
    os.makedirs(live)
    write_profile(live, paths, "a", "b", (2, 4))  # the layout: segments at 2 and 4, E cache at 2
    engine = Engine(paths["base"], served_model_name="base", models=(f"a={paths['a']}", f"b={paths['b']}"),
                    lora_paths=(f"la={paths['la']}",), cross_model_profiles=live, dtype="float32",
                    max_total_tokens=4096)
    status = lambda: {(p["sender"], p["receiver"]): p for p in engine.cross_policy.describe()}  # noqa: E731
    assert status()[("a", "b")]["status"] == "profiled"
    missing = status()[("b", "a")]
    assert missing["status"] == "missing" and missing["command"] == "droidspeak profile --sender b --receiver a"
    assert len(status()) == 4 * 3
    write_profile(live, paths, "b", "a", (2, 4))
    write_profile(live, paths, "a", "la", (0, 2))
    write_profile(live, paths, "b", "la", (1, 3))  # not whole segments of the running pool
    pairs = {(p["sender"], p["receiver"]): p for p in engine.reload_cross_model_profiles()}
    assert pairs[("b", "a")]["recompute_layers"] == [2, 4] and pairs[("a", "la")]["recompute_layers"] == [0, 2]
    assert "restart" in pairs[("b", "la")]["status"] and "[1, 3)" in pairs[("b", "la")]["status"]
    ids = ids_of(engine, CONTEXT + QUESTIONS[0])
    run(engine, "b", ids, len(ids_of(engine, CONTEXT)))
    out = run(engine, "a", ids_of(engine, CONTEXT + QUESTIONS[1]), len(ids_of(engine, CONTEXT)))
    assert out["meta_info"]["cross_model_cached_tokens"] > 0  # b -> a, profiled after start
    # An adapter loaded while serving joins with the profile already waiting for it.
    write_profile(live, {**paths, "lb": paths["la"]}, "a", "lb", (2, 4))
    engine.load_lora_adapter("lb", paths["la"])
    assert status()[("a", "lb")]["recompute_layers"] == [2, 4]
    # An idle engine notices a changed directory by itself.
    write_profile(live, paths, "base", "a", (2, 4))
    engine._profile_dir_checked = 0.0
    engine.idle_tick()
    assert status()[("base", "a")]["status"] == "profiled"
    assert_no_leak(engine)


def test_span_recompute_native_equals_reference(engine, monkeypatch):
    """The layer-span recompute over a stored prefix runs the native fused op
    (RoPE, KV store, attention over the pool's slots); the torch reference path
    writes the same KV and gives the same logits."""
    from droidspeak import kernels
    assert kernels.native_available()
    ids = ids_of(engine, CONTEXT + QUESTIONS[0])
    ctx = len(ids_of(engine, CONTEXT))
    a, b = engine.resolve("a"), engine.resolve("b")
    runner = engine.runner

    def recompute():
        sender, receiver = Sequence(runner), Sequence(runner)
        try:
            sender.extend(ids[:ctx], a.model_id, keep_e=True)
            receiver.reuse(sender, ctx, (2, 4), b.model_id)
            logits = receiver.extend(ids[ctx:], b.model_id)  # the recompute runs in this forward
            slots = receiver.table[1, :ctx].long()  # segment 1 = layers [2, 4)
            kv = torch.stack([runner.kv_pool.k[2:4, slots], runner.kv_pool.v[2:4, slots]]).clone()
            return kv, logits
        finally:
            sender.release()
            receiver.release()
    native_kv, native_logits = recompute()
    monkeypatch.setattr(kernels, "_native", None)
    ref_kv, ref_logits = recompute()
    torch.testing.assert_close(native_kv, ref_kv, atol=1e-5, rtol=0)
    torch.testing.assert_close(native_logits, ref_logits, atol=1e-4, rtol=0)


def test_drift_guard_flags_and_retargets(family, caplog):
    """The fake profile promises [2, 4) loses 0.5%; on live hits it loses more,
    so after a window of checks the guard re-scores the frontier and moves the
    pair to the smallest runnable group within budget (here all layers)."""
    eng = make_engine(family, cross_model_drift_check_s=1e-6)
    eng.drift_guard.sample_every = 1
    a, b = eng.resolve("a").cache_namespace, eng.resolve("b").cache_namespace
    excesses = []
    with caplog.at_level(logging.WARNING, logger="droidspeak.crossmodel.drift"):
        for i in range(4):
            context = f"Context {i}: " + CONTEXT
            ctx = len(ids_of(eng, context))
            run(eng, "a", ids_of(eng, context + QUESTIONS[0]), ctx)
            run(eng, "b", ids_of(eng, context + QUESTIONS[1]), ctx)
            assert eng.drift_guard.due()
            before = eng.drift_guard.num_checks
            eng.idle_tick()
            assert eng.drift_guard.num_checks == before + 1
            excesses.append(eng.drift_guard.pairs[(a, b)].observed[-1] if eng.drift_guard.pairs[(a, b)].observed
                            else None)
    assert excesses[0] > 0.02  # live loss is well above the profiled 0.5%
    assert eng.drift_guard.pairs[(a, b)].flagged and "drifted" in caplog.text
    assert eng.cross_policy.group(a, b, False, 10) == (0, NUM_LAYERS)
    assert eng.drift_guard.measure(eng.drift_guard.pairs[(a, b)].samples[-1], (0, NUM_LAYERS)) == 0
    assert_no_leak(eng)


def test_abort_during_cross_hit_frees_everything(engine):
    """A receiver request aborted right after its cross-model prefill (a dropped
    client) gives back its recomputed slots; the sender's entry is intact."""
    engine.flush_cache()
    ids = ids_of(engine, CONTEXT + QUESTIONS[0])
    ctx = len(ids_of(engine, CONTEXT))
    run(engine, "a", ids_of(engine, CONTEXT + QUESTIONS[1]), ctx)
    held = engine.runner.allocator.num_referenced
    reqs, _ = engine.make_requests(input_ids=ids, sampling_params={"max_new_tokens": 50, "ignore_eos": True},
                                   model="b")
    engine.scheduler.add_request(reqs[0])
    engine.scheduler.step()  # the prefill with the recompute of layers [2, 4)
    assert reqs[0].cross_model_tokens >= ctx and not reqs[0].finished
    engine.scheduler.step()  # one decode step
    assert engine.scheduler.abort_request(reqs[0].rid) != []
    assert_no_leak(engine)
    assert engine.runner.allocator.num_referenced >= held  # a's entry (b's may be cached too)
    again = run(engine, "b", ids, ctx)
    assert again["meta_info"]["cached_tokens"] == ctx


@pytest.mark.parametrize("part_layers", [6, 1])
def test_cross_model_hit_from_the_kv_store(family, tmp_path, part_layers):
    """One engine runs the sender and writes its KV and E cache through to a disk
    tier; another engine's receiver, whose prompt shares the context, loads the
    sender's chunks and reuses them with its group recomputed, exactly as if the
    sender's entry had been in its own tree. Loading is pipelined: the E cache is
    fetched first, and the recompute runs while later layers still stream in."""
    from droidspeak.kvstore.link import ThrottledTier
    store = dict(kv_store=f"disk:{tmp_path}", kv_store_write="through", kv_store_levels="lossless",
                 kv_store_load="always", kv_store_chunk_size=16, kv_store_part_layers=part_layers)
    first = make_engine(family, **store)
    try:
        ids = ids_of(first, CONTEXT + QUESTIONS[0])
        ctx = len(ids_of(first, CONTEXT))
        run(first, "a", ids_of(first, CONTEXT + QUESTIONS[1]), ctx)
        first.offloader.flush()
    finally:
        first.shutdown()
    second = make_engine(family, **store)
    try:
        state = second.offloader.store.states[0]
        state.tier = ThrottledTier(state.tier, bandwidth_bytes_per_s=1e9, latency_s=0.01)
        fetched = record_fetches(second.offloader)
        recompute_starts, recompute = [], second.runner.recompute

        def spy_recompute(*args, **kw):
            recompute_starts.append(time.perf_counter())
            return recompute(*args, **kw)
        second.runner.recompute = spy_recompute
        out = run(second, "b", ids, ctx)
        span = ctx // 16 * 16  # whole chunks of the shared context
        e_parts = [i for i, (key, _) in enumerate(fetched) if key.split(":")[-2].startswith("e")]
        assert e_parts == list(range(len(e_parts))) and e_parts  # the E cache is queued first
        assert len(recompute_starts) == 1
        if part_layers == 1:  # recompute began before the last layer arrived
            assert recompute_starts[0] < max(t for _, t in fetched)
        meta = out["meta_info"]
        assert span >= 32 and meta["kv_store_cached_tokens"] == span
        assert meta["cached_tokens"] == meta["cross_model_cached_tokens"] == span
        expected = reference_logprobs(second, "a", "b", ids, span, (2, 4))[ctx - span:]
        own = reference_logprobs(second, "a", "b", ids, span, None)[ctx - span:]
        assert torch.allclose(engine_logprobs(out), expected, atol=1e-5)
        assert not torch.allclose(expected, own, atol=1e-3)  # it really reused the sender's KV
        assert_no_leak(second)
    finally:
        second.shutdown()


def test_receiver_only_engine_reuses_a_remote_senders_stored_kv(family, tmp_path):
    """An engine that hosts the receiver but not the sender names the sender by
    its identity (remote_senders): it finds the sender's KV and E cache in the
    shared tier and reuses them with its profiled recompute, exactly as an
    engine that hosts both does, without ever loading the sender's weights."""
    import shutil
    paths, profiles = family

    def store(name):
        return dict(kv_store=f"disk:{tmp_path / name}", kv_store_write="through", kv_store_levels="lossless",
                    kv_store_load="always", kv_store_chunk_size=16)
    writer = make_engine(family, **store("shared"))
    try:
        ids = ids_of(writer, CONTEXT + QUESTIONS[0])
        ctx = len(ids_of(writer, CONTEXT))
        run(writer, "a", ids_of(writer, CONTEXT + QUESTIONS[1]), ctx)
        writer.offloader.flush()
        identity = writer.identity("a")
    finally:
        writer.shutdown()
    shutil.copytree(tmp_path / "shared", tmp_path / "copy")  # each reader sees only a's chunks
    full = make_engine(family, **store("copy"))
    try:
        expected = run(full, "b", ids, ctx)
        assert expected["meta_info"]["cross_model_cached_tokens"] == ctx // 16 * 16
    finally:
        full.shutdown()
    receiver = Engine(paths["base"], served_model_name="base", models=(f"b={paths['b']}",),
                      remote_senders=(f"a={identity}",), cross_model_profiles=profiles,
                      dtype="float32", max_total_tokens=4096, **store("shared"))
    try:
        assert len(receiver.runner.models) == 2  # base and b: a's weights are not here
        assert receiver.identity("a") == identity
        out = run(receiver, "b", ids, ctx)
        span = ctx // 16 * 16
        meta = out["meta_info"]
        assert meta["kv_store_cached_tokens"] == meta["cross_model_cached_tokens"] == span
        assert torch.equal(engine_logprobs(out), engine_logprobs(expected))
        assert out["output_ids"] == expected["output_ids"]
        assert receiver.cross_policy.stats[("a", "b")].hits == 1
        pairs = {(p["sender"], p["receiver"]): p["status"] for p in receiver.cross_policy.describe()}
        assert pairs[("a", "b")] == "profiled" and ("b", "a") not in pairs  # a only sends here
        with pytest.raises(ModelNotFoundError, match="served by another engine"):
            run(receiver, "a", ids, ctx)
        assert_no_leak(receiver)
    finally:
        receiver.shutdown()
    with pytest.raises(InvalidRequestError, match="kv_store"):
        Engine(paths["base"], remote_senders=(f"a={identity}",), dtype="float32")
