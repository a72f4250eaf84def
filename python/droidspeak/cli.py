"""`droidspeak` command line: prepare-model, generate, serve."""
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
        base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
        kwargs = dict(type=base, default=f.default, help=help_text)
        if f.name == "schedule_policy":
            kwargs["choices"] = SCHEDULE_POLICIES
        parser.add_argument(flag, **kwargs)


def engine_kwargs(args: argparse.Namespace) -> dict:
    kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)}
    kwargs["models"] = tuple(kwargs["models"])
    kwargs["lora_paths"] = tuple(kwargs["lora_paths"])
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


def main(argv: list[str] | None = None) -> int:
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

    try:
        from droidspeak.server.launch import add_serve_parser
    except ImportError:
        pass
    else:
        add_serve_parser(sub, add_engine_args, engine_kwargs)

    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
