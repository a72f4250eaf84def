"""The offline engine, shaped like `sglang.Engine`: build once, call `generate`.

The engine drives the scheduler in the caller's thread; one call to `generate`
(or one open stream) at a time.
"""
from __future__ import annotations

import concurrent.futures
import itertools
import json
import logging
import os
import random
import time
from collections.abc import Iterator
from typing import NamedTuple

import torch

from droidspeak.cachegen.transform import CodecProfile, CodecProfileError, default_codec_profile_path
from droidspeak.config import EngineConfig, parse_model_entries
from droidspeak.crossmodel.drift import MAX_TAIL_TOKENS, DriftGuard, HitSample
from droidspeak.crossmodel.policy import CrossModelPolicy
from droidspeak.crossmodel.profile import default_profile_dir
from droidspeak.errors import InvalidRequestError, LimitExceededError, ModelNotFoundError, PromptTooLongError
from droidspeak.engine.io import format_output, normalize_inputs, per_prompt
from droidspeak.kernels import native_available
from droidspeak.kvstore.keys import Namespace
from droidspeak.kvstore.offload import KVOffloader
from droidspeak.kvstore.store import TieredStore
from droidspeak.kvstore.tiers import make_tiers
from droidspeak.lora.adapter import load_adapter
from droidspeak.models.config import ModelConfig
from droidspeak.models_file import load_models_file
from droidspeak.models.default_model import cache_dir, resolve_model_path
from droidspeak.models.identity import fingerprint
from droidspeak.models.lineage import DECLARED_BASE_KEY, LineageInfo, check_family
from droidspeak.kvcache.pool import KVLayout
from droidspeak.runner.model_runner import ModelRunner
from droidspeak.sampling.params import SamplingParams
from droidspeak.scheduler.request import AbortCause, Req
from droidspeak.scheduler.scheduler import Scheduler
from droidspeak.tokenizer.detokenizer import IncrementalDetokenizer
from droidspeak.tokenizer.tokenizer import encode_text, eos_token_ids, load_tokenizer, max_token_chars

logger = logging.getLogger(__name__)

# Prefix-cache namespaces of LoRA adapters start here (full models use 0..N-1).
LORA_NAMESPACE_BASE = 1 << 16    # cache variants of adapters: this plus the adapter's id
REMOTE_NAMESPACE_BASE = 1 << 20  # cache variants of remote senders: this plus their index
PROFILE_DIR_CHECK_S = 5.0  # how often an idle engine looks for new cross-model profiles
STORE_WAIT_TIMEOUT_S = 60.0  # longest an offline wait_for_kv_store call waits for its writes


def _mtime(path: str | None) -> int | None:
    try:
        return os.stat(path).st_mtime_ns if path else None
    except OSError:
        return None


class Target(NamedTuple):
    model_id: int            # the full model whose weights run
    lora_id: int | None      # adapter applied on top, if any
    cache_namespace: int


def _with_models_file(config: EngineConfig) -> EngineConfig:
    """Merge `config.models_file` in: flags win for the base, the file's members come first."""
    if not config.models_file:
        return config
    family = load_models_file(config.models_file)
    return config.replace(model_path=config.model_path or family.base_path,
                          served_model_name=config.served_model_name or family.base_name,
                          models=family.models + config.models, lora_paths=family.lora + config.lora_paths,
                          remote_senders=family.remote + config.remote_senders)


class Engine:
    def __init__(self, model_path: str | None = None, dtype: str = "auto", kv_layout: KVLayout | None = None,
                 **kwargs):
        """`kwargs` are EngineConfig fields. `kv_layout` overrides the KV segments and
        E-cache layers the cross-model profiles ask for (the profiler sweeps groups)."""
        self.config = _with_models_file(EngineConfig(model_path=model_path, dtype=dtype, **kwargs))
        model_path = self.config.model_path
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        self.model_path = resolve_model_path(model_path)
        root_name = self.config.served_model_name or os.path.basename(os.path.normpath(self.model_path))
        members = [(root_name, self.model_path)] + [
            (name, resolve_model_path(path)) for name, path in parse_model_entries(self.config.models)]
        # Members served elsewhere: their KV can be found in the KV store by their
        # identity, so this engine reuses it without their weights.
        self._remote = dict(parse_model_entries(self.config.remote_senders))
        names = [n for n, _ in members]
        if len(set(names + list(self._remote))) != len(names) + len(self._remote):
            raise InvalidRequestError(f"model names must be unique, got {names + list(self._remote)}", "models")
        self.tokenizer = load_tokenizer(self.model_path)
        self._max_token_chars = max_token_chars(self.tokenizer)
        self._call_ids = itertools.count(1)  # Req.group of each make_requests call
        self._fingerprints: dict[str, str] = {}
        self._profile_dir, self._profile_dir_seen, self._profile_dir_checked = None, None, 0.0
        self.cross_policy = self._load_cross_policy(root_name, members)
        self.runner = ModelRunner(self.config, [p for _, p in members], kv_layout or self.cross_policy.layout)
        self._full_model_names = names
        self._full_model_paths = [p for _, p in members]
        self.lineage = self._check_lineage(members)
        self._adapters: dict[str, int] = {}   # adapter name -> id in runner.adapters
        self._adapter_ids = itertools.count(1)
        self._namespaces: dict[int, Namespace] = {}
        for name, path in parse_model_entries(self.config.lora_paths):
            self.load_lora_adapter(name, path)
        self.eos_token_ids = eos_token_ids(self.tokenizer, self.runner.model_config.eos_token_ids)
        self._rebind()
        self.offloader = self._make_offloader() if self.config.kv_store else None
        self.scheduler = Scheduler(self.config, self.runner, self.eos_token_ids, self.cross_policy, self.offloader)
        self.drift_guard = DriftGuard(self.cross_policy, self.runner, self.config.cross_model_drift_check_s)
        self.cross_policy.hit_listener = self._sample_hit
        self._seed_rng = random.Random(self.config.random_seed)
        logger.info("engine ready: %s, dtype=%s, threads=%d, native ops=%s", self.model_path,
                    self.config.resolved_dtype, torch.get_num_threads(), native_available())

    def _load_cross_policy(self, root_name: str, members: list[tuple[str, str]]) -> CrossModelPolicy:
        num_layers = ModelConfig.from_dir(self.model_path).num_layers
        if self.config.disable_cross_model:
            return CrossModelPolicy([], self.config.cross_model_quality, num_layers)
        directory = self._profile_dir = self.config.cross_model_profiles or default_profile_dir(root_name)
        self._profile_dir_seen = _mtime(directory)
        paths = dict(members)
        paths.update(parse_model_entries(self.config.lora_paths))
        return CrossModelPolicy.from_directory(directory, self._profile_fingerprints(paths),
                                               self.config.cross_model_quality, num_layers,
                                               self.config.cross_model_idle_ttft_ms)

    def _profile_fingerprints(self, paths: dict[str, str]) -> dict[str, str]:
        """name -> what a profile of it must have been made for: the fingerprint of
        each hosted member's own weights (an adapter's alone), and of each remote
        sender's (the last part of its identity)."""
        out = {name: self._fingerprint(path) for name, path in paths.items()}
        out.update((name, identity.rsplit("+", 1)[-1]) for name, identity in self._remote.items())
        return out

    def reload_cross_model_profiles(self) -> list[dict]:
        """Read the profile directory again (call between scheduler steps): profiles
        made or re-made since start, and pairs of adapters loaded since, join where
        their group fits the running KV layout. Returns every pair's status."""
        if not self.config.disable_cross_model:
            self._profile_dir_seen = _mtime(self._profile_dir)
            self.cross_policy.reload(self._profile_dir, self._profile_fingerprints(self.model_paths),
                                     self.runner.layout, self.runner.supports_group)
        return self.cross_policy.describe()

    def _make_offloader(self) -> KVOffloader:
        c = self.config
        try:
            tiers = make_tiers(c.kv_store, c.kv_store_ram_mb << 20,
                               c.kv_store_disk_dir or os.path.join(cache_dir(), "kvstore"),
                               int(c.kv_store_disk_gb * (1 << 30)))
        except (ValueError, OSError) as e:
            raise InvalidRequestError(f"kv_store: {e}", "kv_store") from None
        if not tiers:
            raise InvalidRequestError(f"kv_store {c.kv_store!r} names no tier", "kv_store")
        store = TieredStore(tiers, bandwidth_override=c.kv_store_bandwidth_mbps and c.kv_store_bandwidth_mbps * 1e6)
        levels = tuple(lv.strip() for lv in c.kv_store_levels.split(",") if lv.strip())
        profile = self._load_codec_profile()
        try:
            offloader = KVOffloader(store, self.runner.kv_pool, self.runner.e_pool, self._namespaces.get,
                                    c.kv_store_chunk_size, levels,
                                    None if c.kv_store_ttft_ms is None else c.kv_store_ttft_ms / 1e3,
                                    adaptive=c.kv_store_load == "adaptive", part_layers=c.kv_store_part_layers,
                                    codec_profile=profile)
        except ValueError as e:
            raise InvalidRequestError(str(e), "kv_store_levels") from None
        logger.info("KV store: tiers %s, %d-token chunks in parts of %d layers at levels %s",
                    [t.name for t in tiers], c.kv_store_chunk_size, c.kv_store_part_layers, list(offloader.levels))
        return offloader

    def _load_codec_profile(self) -> CodecProfile | None:
        """The root model's codec profile for the KV store's lossy levels: the one
        named by --kv-store-codec-profile (an error if unusable), else the one
        `droidspeak codec-profile` made for these weights, if any."""
        given = self.config.kv_store_codec_profile
        if given == "none":
            return None
        path = given or default_codec_profile_path(self.model_path, self._fingerprint(self.model_path))
        try:
            if not os.path.isfile(path):
                raise CodecProfileError(f"{path} does not exist")
            profile = CodecProfile.load(path)
            L = self.runner.kv_pool.num_layers
            profile.check(0, L, L, 2 * self.runner.kv_pool.k.shape[2] * self.runner.kv_pool.k.shape[3])
        except (CodecProfileError, ValueError) as e:
            if given:
                raise InvalidRequestError(f"kv_store_codec_profile: {e}", "kv_store_codec_profile") from None
            logger.warning("KV store: no codec profile for this model (%s); lossy levels code without one, "
                           "about 1.6x larger. Make one with `droidspeak codec-profile --model-path %s`",
                           e, self.model_path)
            return None
        logger.info("KV store: codec profile %s (tag %016x)", path, profile.tag)
        return profile

    def _fingerprint(self, path: str) -> str:
        if path not in self._fingerprints:
            self._fingerprints[path] = fingerprint(path)
        return self._fingerprints[path]

    def _sample_hit(self, sender: int, receiver: int, prompt_ids: list[int], span_end: int, group,
                    tail: float = 1.0) -> None:
        if sender not in self._by_variant or receiver not in self._by_variant or span_end >= len(prompt_ids):
            return
        s, r = self._by_variant[sender][1], self._by_variant[receiver][1]
        self.drift_guard.record(HitSample(sender, receiver, list(prompt_ids[:span_end + MAX_TAIL_TOKENS]), span_end,
                                          group, (s.model_id, s.lora_id), (r.model_id, r.lora_id), tail))

    def idle_tick(self) -> None:
        """Background work for an idle engine (the server calls it when nothing is
        queued): the cross-model drift check, when one is due, and a reload of the
        profiles when their directory changed."""
        if not self.scheduler.is_idle:
            return
        if self.drift_guard.due():
            self.drift_guard.check_one(make_room=self.scheduler.cache.evict)
        now = time.monotonic()
        if not self.config.disable_cross_model and now - self._profile_dir_checked >= PROFILE_DIR_CHECK_S:
            self._profile_dir_checked = now
            if _mtime(self._profile_dir) != self._profile_dir_seen:
                logger.info("cross-model profiles changed in %s: reloading", self._profile_dir)
                self.reload_cross_model_profiles()

    def model_name_of(self, req: Req) -> str:
        """The name of the model or adapter a request ran on (adapter ids are never
        reused, so an unloaded adapter's late requests keep a stable label)."""
        entry = self._by_variant.get(req.cache_namespace)
        return entry[0] if entry else f"unloaded-adapter-{req.lora_id}"

    def _variants(self) -> dict[str, int]:
        """Every member's cache variant, remote senders included."""
        variants = {name: variant for variant, (name, _) in self._by_variant.items()}
        variants.update((name, REMOTE_NAMESPACE_BASE + i) for i, name in enumerate(self._remote))
        return variants

    def _rebind(self) -> None:
        """Refresh the variant -> (name, Target) map and the policy's view of it
        (at start and whenever adapters come or go)."""
        self._by_variant = {}
        for name in self.model_names:
            target = self.resolve(name)
            self._by_variant[target.cache_namespace] = (name, target)
        self.cross_policy.bind(self._variants(), tuple(self._remote))
        if self.config.kv_store:
            # Stored KV is named by the weights that computed it, so engines that
            # call a model differently still share it.
            root = self._fingerprint(self._full_model_paths[0])
            self._namespaces = {variant: Namespace(root, self.identity(name), self.config.resolved_dtype,
                                                   self.config.kv_store_chunk_size)
                                for name, variant in self._variants().items()}

    def identity(self, name: str | None) -> str:
        """The fingerprint of the weights that serve `name`: a full model's, or an
        adapter's with its base model's before it (models.identity); a remote
        sender's as configured."""
        if name in self._remote:
            return self._remote[name]
        target = self.resolve(name)
        model = self._fingerprint(self._full_model_paths[target.model_id])
        if target.lora_id is not None:
            model += "+" + self._fingerprint(self.runner.adapters[target.lora_id].path)
        return model

    def _check_lineage(self, members: list[tuple[str, str]]) -> dict[str, LineageInfo]:
        root_name, _ = members[0]
        root = self.runner.models[0]
        info = {root_name: LineageInfo(root_name, None, "root")}
        for i, (name, path) in enumerate(members[1:], 1):
            config = self.runner.models[i].config
            with open(os.path.join(path, "config.json")) as f:
                declared = json.load(f).get(DECLARED_BASE_KEY)
            info[name] = check_family(root_name, root.config, self.tokenizer, root.embed_tokens.weight,
                                      name, config, load_tokenizer(path), self.runner.models[i].embed_tokens.weight,
                                      declared)
            logger.info("model %s joins the family of %s (%s)", name, root_name, info[name].evidence)
        return info

    @property
    def model_names(self) -> list[str]:
        """Full models first (the root at 0), then LoRA adapters."""
        return self._full_model_names + list(self._adapters)

    def resolve(self, name: str | None) -> Target:
        """Where requests for `name` run (None: the root model)."""
        if name is None:
            return Target(0, None, 0)
        if name in self._adapters:
            lora_id = self._adapters[name]
            return Target(0, lora_id, LORA_NAMESPACE_BASE + lora_id)
        try:
            model_id = self._full_model_names.index(name)
        except ValueError:
            if name in self._remote:
                raise ModelNotFoundError(f"model {name!r} is served by another engine: this one reuses its "
                                         f"stored KV but does not host it; models here: {self.model_names}") from None
            raise ModelNotFoundError(f"model {name!r} not found; known models: {self.model_names}") from None
        return Target(model_id, None, model_id)

    def model_id(self, name: str | None) -> int:
        """Index of the full model serving `name` (404 for unknown names)."""
        return self.resolve(name).model_id

    def load_lora_adapter(self, name: str, path: str) -> None:
        """Load a PEFT LoRA adapter on the root model under `name`. Call between
        scheduler steps (the server runs it on the scheduler thread)."""
        if name in self.model_names or name in self._remote:
            raise InvalidRequestError(f"a model named {name!r} is already loaded", "lora_name")
        adapter = load_adapter(name, path, self.runner.model_config, self.runner.dtype)
        lora_id = next(self._adapter_ids)
        self.runner.adapters[lora_id] = adapter
        self._adapters[name] = lora_id
        root = self._full_model_names[0]
        self.lineage[name] = LineageInfo(root, root, f"LoRA adapter, rank {adapter.rank}")
        self._rebind()
        if hasattr(self, "scheduler"):  # loaded while serving: its pairs' profiles join
            self.reload_cross_model_profiles()
        logger.info("loaded LoRA adapter %s (rank %d) from %s", name, adapter.rank, path)

    @property
    def model_paths(self) -> dict[str, str]:
        """Every hosted model's weights: name -> directory (full models, then adapters)."""
        return {**dict(zip(self._full_model_names, self._full_model_paths)), **self.lora_adapters}

    @property
    def lora_adapters(self) -> dict[str, str]:
        """Loaded adapters: name -> path."""
        return {name: self.runner.adapters[lid].path for name, lid in self._adapters.items()}

    def unload_lora_adapter(self, name: str) -> None:
        """Unload adapter `name`; refused while requests use it. Its prefix-cache
        entries are never matched again (adapter ids are not reused) and age out."""
        if name not in self._adapters:
            raise ModelNotFoundError(f"no LoRA adapter named {name!r}; loaded: {list(self._adapters)}")
        lora_id = self._adapters[name]
        busy = [r for r in self.scheduler.in_flight() if r.lora_id == lora_id]
        if busy:
            raise InvalidRequestError(f"LoRA adapter {name!r} is serving {len(busy)} request(s)", "lora_name")
        del self._adapters[name]
        del self.runner.adapters[lora_id]
        del self.lineage[name]
        self._rebind()
        self.reload_cross_model_profiles()

    # ---- request construction ---------------------------------------------
    def make_requests(self, prompt=None, sampling_params=None, input_ids=None, *,
                      return_logprob=False, logprob_start_len=None, top_logprobs_num=0,
                      stream=False, rid=None, model: str | list[str | None] | None = None,
                      timeout_s: float | None = None, wait_for_kv_store: bool = False) -> tuple[list[Req], bool]:
        """Validated requests for one (batched) call; the bool says whether the
        caller passed a single prompt. `model` and the logprob arguments take one
        value for all prompts or a list with one per prompt (None: the root model).
        `timeout_s` (default: the config's request_timeout_s) aborts the requests
        that run longer. `wait_for_kv_store`: the final output waits until the
        request's write-through chunks are stored (so another engine on a shared
        tier finds them). The fan-out limits are checked before any text is tokenized."""
        prompts, params_list, rids, single = normalize_inputs(prompt, input_ids, sampling_params, rid)
        n = len(prompts)
        c = self.config
        if n > c.max_prompts_per_request:
            raise LimitExceededError(f"{n} prompts in one request; at most {c.max_prompts_per_request} "
                                     "(max_prompts_per_request)", "input_ids" if prompt is None else "text",
                                     "max_prompts_per_request")
        targets = [self.resolve(name) for name in per_prompt(model, "model", n)]
        params_list = [SamplingParams.from_dict(raw) for raw in params_list]
        for params in params_list:
            if params.n > c.max_n:
                raise LimitExceededError(f"n is {params.n}; at most {c.max_n} (max_n)", "n", "max_n")
        fanout = sum(params.n for params in params_list)
        if fanout > c.max_fanout_per_request:
            raise LimitExceededError(f"the request fans out to {fanout} sub-requests (prompts x n); at most "
                                     f"{c.max_fanout_per_request} (max_fanout_per_request)", "n",
                                     "max_fanout_per_request")
        timeout_s = c.request_timeout_s if timeout_s is None else timeout_s
        if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
                                      or not timeout_s > 0):
            raise InvalidRequestError(f"request_timeout_s must be a number > 0, got {timeout_s!r}",
                                      "request_timeout_s")
        logprob_args = zip(per_prompt(return_logprob, "return_logprob", n),
                           per_prompt(logprob_start_len, "logprob_start_len", n),
                           per_prompt(top_logprobs_num, "top_logprobs_num", n))
        vocab = self.runner.model_config.vocab_size
        group = next(self._call_ids)
        deadline = None if timeout_s is None else time.perf_counter() + timeout_s
        reqs = []
        for text_or_ids, params, base_rid, target, (want_logprob, start, top) in zip(
                prompts, params_list, rids, targets, logprob_args):
            if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= vocab):
                raise InvalidRequestError(f"top_logprobs_num must be an integer in [0, {vocab}], got {top!r}",
                                          "top_logprobs_num")
            ids = self._encode(text_or_ids, params) if isinstance(text_or_ids, str) else text_or_ids
            self.scheduler.validate(ids, params.max_new_tokens)
            for copy in range(params.n):
                seed = (params.sampling_seed + copy if params.sampling_seed is not None
                        else self._seed_rng.getrandbits(63))
                reqs.append(Req(
                    rid=base_rid if params.n == 1 else f"{base_rid}-{copy}",
                    origin_input_ids=list(ids),
                    sampling_params=params,
                    detokenizer=IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens,
                                                       params.spaces_between_special_tokens),
                    generator=torch.Generator().manual_seed(seed),
                    return_logprob=bool(want_logprob),
                    logprob_start_len=-1 if start is None else start,
                    top_logprobs_num=top or 0,
                    stream=stream,
                    model_id=target.model_id,
                    lora_id=target.lora_id,
                    cache_namespace=target.cache_namespace,
                    parent_rid=base_rid,
                    group=group,
                    deadline=deadline,
                    wait_for_kv_store=bool(wait_for_kv_store),
                ))
        return reqs, single and len(reqs) == 1

    def _encode(self, text: str, params: SamplingParams) -> list[int]:
        self.check_text_length(len(text), params.max_new_tokens)
        return encode_text(self.tokenizer, text)

    def check_text_length(self, chars: int, max_new_tokens: int = 0, field: str = "text") -> None:
        """Refuse, before tokenizing, text too long for the context whatever its
        tokens (tokenizing it would be work bounded only by the body size)."""
        room = max(self.runner.context_length - max_new_tokens, 1)
        if chars > room * self._max_token_chars:
            raise PromptTooLongError(
                f"{field} has {chars} characters: more than the context length ({self.runner.context_length} "
                f"tokens, of at most {self._max_token_chars} characters each) can hold", field)

    # ---- public API -----------------------------------------------------------
    def generate(self, prompt=None, sampling_params=None, input_ids=None, stream: bool = False,
                 return_logprob: bool = False, logprob_start_len: int | None = None,
                 top_logprobs_num: int = 0, return_text_in_logprobs: bool = False, rid=None,
                 model: str | list[str | None] | None = None, timeout_s: float | None = None,
                 wait_for_kv_store: bool = False):
        """One prompt (text or ids) -> one SGLang-shaped dict; a list -> a list.
        With stream=True, an iterator of dicts with cumulative text. `model` picks a
        family member by name (default: the root model), or one per prompt."""
        reqs, single = self.make_requests(
            prompt, sampling_params, input_ids, return_logprob=return_logprob,
            logprob_start_len=logprob_start_len, top_logprobs_num=top_logprobs_num,
            stream=stream, rid=rid, model=model, timeout_s=timeout_s, wait_for_kv_store=wait_for_kv_store)
        fmt = dict(tokenizer=self.tokenizer, return_text_in_logprobs=return_text_in_logprobs)
        if stream:
            return self._stream(reqs, single, fmt)
        for _ in self._drive(reqs):
            pass
        if wait_for_kv_store:
            concurrent.futures.wait([f for r in reqs for f in r.store_writes], timeout=STORE_WAIT_TIMEOUT_S)
        results = [format_output(r, **fmt) for r in reqs]
        return results[0] if single else results

    def _drive(self, reqs: list[Req]) -> Iterator:
        """Add `reqs`, step the scheduler until all finish, yielding each output;
        aborts whatever is left if the consumer goes away or a step fails."""
        for r in reqs:
            self.scheduler.add_request(r)
        try:
            while not all(r.finished for r in reqs):
                yield from self.scheduler.step()
        finally:
            unfinished = [r for r in reqs if not r.finished]
            if unfinished:
                self.scheduler.abort(unfinished, AbortCause.DISCONNECT)

    def _stream(self, reqs: list[Req], single: bool, fmt: dict) -> Iterator[dict]:
        index = {id(r): i for i, r in enumerate(reqs)}
        for out in self._drive(reqs):
            if id(out.req) not in index:
                continue
            result = format_output(out.req, **fmt)
            if not single:
                result["index"] = index[id(out.req)]
            yield result

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def flush_cache(self) -> bool:
        return self.scheduler.flush_cache()

    def shutdown(self) -> None:
        if getattr(self, "offloader", None) is not None:
            self.offloader.close()
            self.offloader = None
        self.scheduler = None
        self.runner = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
