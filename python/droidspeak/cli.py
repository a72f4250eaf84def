"""`droidspeak` command line: prepare-model, generate, profile, codec-profile, serve."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing

from droidspeak.config import SCHEDULE_POLICIES, EngineConfig


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineConfig field, defaults from the dataclass (SGLang names)."""
    hints = typing.get_type_hints(EngineConfig)
    for f in dataclasses.fields(EngineConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        help_text = f"{f.metadata.get('help', '')} (default: {f.default})"
        if hint is bool:
            parser.add_argument(flag, action="store_true", help=help_text)
            continue
        if f.name == "lora_paths":
            parser.add_argument("--lora-paths", dest="lora_paths", nargs="*", default=[], metavar="NAME=PATH",
                                help=help_text)
            continue
        if f.name == "models":
            parser.add_argument("--model", dest="models", action="append", default=[], metavar="NAME=PATH",
                                help=help_text)
            continue
        if f.name == "remote_senders":
            parser.add_argument("--remote-sender", dest="remote_senders", action="append", default=[],
                                metavar="NAME=FINGERPRINT", help=help_text)
            continue
        base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
        kwargs = dict(type=base, default=f.default, help=help_text)
        if f.name == "schedule_policy":
            kwargs["choices"] = SCHEDULE_POLICIES
        parser.add_argument(flag, **kwargs)


def engine_kwargs(args: argparse.Namespace) -> dict:
    kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)}
    kwargs["models"] = tuple(kwargs["models"])
    kwargs["lora_paths"] = tuple(kwargs["lora_paths"])
    kwargs["remote_senders"] = tuple(kwargs["remote_senders"])
    return kwargs


def cmd_prepare_model(args) -> int:
    from droidspeak.models.default_model import resolve_model_path
    print(resolve_model_path(args.model_path))
    return 0


def cmd_generate(args) -> int:
    from droidspeak.engine.engine import Engine
    kwargs = engine_kwargs(args)
    engine = Engine(**kwargs)
    params = json.loads(args.sampling_params) if args.sampling_params else {}
    if args.stream:
        shown = ""
        for out in engine.generate(args.prompt, params, stream=True):
            sys.stdout.write(out["text"][len(shown):])
            sys.stdout.flush()
            shown = out["text"]
        print()
    else:
        print(json.dumps(engine.generate(args.prompt, params), indent=2))
    return 0


def cmd_profile(args) -> int:
    import os

    from droidspeak.crossmodel.calibration import build_items, load_jsonl
    from droidspeak.crossmodel.profile import Profile, ProfileError, default_profile_dir, profile_path
    from droidspeak.models.identity import fingerprint
    from droidspeak.crossmodel.profiler import DEFAULT_TAILS, Profiler, grid_layout, plot_profile
    from droidspeak.engine.engine import Engine
    from droidspeak.models.config import ModelConfig
    from droidspeak.models.default_model import resolve_model_path

    if not args.family and not (args.sender and args.receiver):
        print("droidspeak profile: give --sender and --receiver, or --family", file=sys.stderr)
        return 2
    kwargs = engine_kwargs(args)
    kwargs["disable_cross_model"] = True
    if kwargs["max_total_tokens"] is None:
        kwargs["max_total_tokens"] = 4 * (args.context_tokens + 512)
    from droidspeak.engine.engine import _with_models_file
    root_path = _with_models_file(EngineConfig(**kwargs)).model_path
    num_layers = ModelConfig.from_dir(resolve_model_path(root_path)).num_layers
    engine = Engine(kv_layout=grid_layout(num_layers, args.step), **kwargs)
    names = engine.model_names
    pairs = [(a, b) for a in names for b in names if a != b] if args.family else [(args.sender, args.receiver)]
    unknown = sorted({n for pair in pairs for n in pair} - set(names))
    if unknown:
        print(f"droidspeak profile: unknown model(s) {unknown}; known: {names}", file=sys.stderr)
        return 2
    items = load_jsonl(args.calibration) if args.calibration else build_items("calibration", args.per_domain)
    out = args.out or default_profile_dir(names[0])
    tails = DEFAULT_TAILS if args.tails is None else tuple(float(t) for t in args.tails.split(",") if t.strip())
    profiler = Profiler(engine, items, args.step, args.context_tokens, args.generate_tokens, tails)
    paths = engine.model_paths
    print(f"profiling {len(pairs)} pair(s) over {len(items)} contexts, {len(profiler.groups)} groups each, "
          f"into {out}", flush=True)
    for sender, receiver in pairs:
        path = profile_path(out, sender, receiver)
        try:
            old = Profile.load(path) if os.path.isfile(path) else None
        except ProfileError:
            old = None
        if old is not None and not args.overwrite and old.sender_fingerprint == fingerprint(paths[sender]) \
                and old.receiver_fingerprint == fingerprint(paths[receiver]):
            print(f"{sender} -> {receiver}: profiled already ({path}); --overwrite redoes it", flush=True)
            continue
        profile = profiler.profile_pair(sender, receiver, out)
        if not args.no_plot:
            plot_profile(profile, path[:-len(".json")] + ".png", args.cross_model_quality)
        target = profile.smallest_meeting(args.cross_model_quality)
        wholesale = next(g for g in profile.groups if g.layers == 0)
        chosen = "none short of full prefill" if target is None else \
            f"layers [{target.start}, {target.end}) over the last {target.tail:.0%} of the context " \
            f"({target.cost / num_layers:.0%} of a prefill)"
        print(f"{sender} -> {receiver}: wholesale reuse +{100 * profile.excess(wholesale):.2f}% soft "
              f"cross-entropy, KL {wholesale.kl:.4f}, agreement {wholesale.agreement:.1%}; smallest group within "
              f"{100 * args.cross_model_quality:g}%: {chosen}; wrote {path}", flush=True)
    return 0


def cmd_codec_profile(args) -> int:
    from droidspeak.cachegen.calibrate import ensure_profile
    from droidspeak.crossmodel.calibration import load_jsonl
    from droidspeak.errors import ModelNotFoundError
    from droidspeak.models.default_model import resolve_model_path

    try:
        path = resolve_model_path(args.model_path)
    except ModelNotFoundError as e:
        print(f"droidspeak codec-profile: {e}", file=sys.stderr)
        return 2
    texts = [(i.context, i.question) for i in load_jsonl(args.calibration)] if args.calibration else None
    out, profile, made = ensure_profile(path, args.out, texts, args.per_domain, args.context_tokens,
                                        args.samples, args.overwrite)
    print(f"wrote {out} (tag {profile.tag:016x})" if made
          else f"codec profile for {path} exists ({out}); --overwrite redoes it")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="droidspeak", description=__doc__)
    parser.add_argument("--log-level", default="info")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare-model", help="convert the default (or a GGUF) model once; print its path")
    p.add_argument("--model-path", default=None)
    p.set_defaults(func=cmd_prepare_model)

    p = sub.add_parser("generate", help="run one prompt offline")
    add_engine_args(p)
    p.add_argument("prompt")
    p.add_argument("--sampling-params", help='JSON, e.g. {"max_new_tokens": 32}')
    p.add_argument("--stream", action="store_true")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("profile", help="measure cross-model reuse quality per layer group for model pairs")
    add_engine_args(p)
    p.add_argument("--sender", help="the model whose KV is reused")
    p.add_argument("--receiver", help="the model that reuses it")
    p.add_argument("--family", action="store_true", help="profile every ordered pair of hosted models")
    p.add_argument("--step", type=int, default=2, help="group boundaries every STEP layers (default: 2)")
    p.add_argument("--tails", default=None,
                   help="shares of the context (from its end) over which every layer is also tried, comma-separated "
                        "(default: sixteenths up to a half, then 0.75); '' for none")
    p.add_argument("--calibration", help="JSONL of {context, question, answer?} (default: built-in offline set)")
    p.add_argument("--per-domain", type=int, default=3,
                   help="built-in set: contexts per domain (code, docs, math) (default: 3)")
    p.add_argument("--context-tokens", type=int, default=512, help="context length (default: 512)")
    p.add_argument("--generate-tokens", type=int, default=16,
                   help="tokens the receiver generates after a question without an answer (default: 16)")
    p.add_argument("--out", help="profile directory (default: $DROIDSPEAK_CACHE/profiles/<root model>)")
    p.add_argument("--overwrite", action="store_true", help="redo pairs that have a current profile")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("codec-profile", help="calibrate the KV codec's transform for a model (the KV store's "
                                              "lossy levels use it)")
    p.add_argument("--model-path", default=None, help="model directory or .gguf (default: the default model)")
    p.add_argument("--out", help="profile file (default: $DROIDSPEAK_CACHE/codec_profiles/<model>-<fingerprint>"
                                 ".safetensors, where the engine looks)")
    p.add_argument("--calibration", help="JSONL of {context, question}: texts and their continuations "
                                         "(default: built-in offline set)")
    p.add_argument("--per-domain", type=int, default=6,
                   help="built-in set: texts per domain (code, docs, math) (default: 6)")
    p.add_argument("--context-tokens", type=int, default=512, help="context length (default: 512)")
    p.add_argument("--samples", type=int, default=2,
                   help="sampled continuations per text for the Fisher estimate (default: 2)")
    p.add_argument("--overwrite", action="store_true", help="redo a current profile")
    p.set_defaults(func=cmd_codec_profile)

    try:
        from droidspeak.server.launch import add_serve_parser
    except ImportError:
        pass
    else:
        add_serve_parser(sub, add_engine_args, engine_kwargs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
