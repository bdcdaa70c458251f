"""`mllm serve CKPT`: the checkpoint behind an OpenAI-compatible HTTP API and a web chat page.

The model is loaded exactly as `mllm chat` loads it (`add_model_arguments` / `load_model`), so a greedy
answer over HTTP is the answer `mllm chat --prompt` prints.
"""

from __future__ import annotations

# Heavy modules (torch, transformers, the model) are imported inside the functions that need them, when the
# command runs: parsing arguments and `--help` stay instant.
import argparse
import dataclasses
import os
import typing

from mllm.cli import UserError
from mllm.cli.options import add_model_arguments, load_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    from mllm.serve.app import ServeConfig
    from mllm.serve.protocol import Limits

    add_model_arguments(p)
    for cls in (ServeConfig, Limits):  # one option per config field, help from the field
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name == "limits":
                continue
            kind = next(a for a in (*typing.get_args(hints[f.name]), hints[f.name]) if a is not type(None))
            help_text = f.metadata["help"]
            default = f.default
            p.add_argument(
                "--" + f.name.replace("_", "-"),
                type=kind,
                default=default,
                help=f"{help_text} (default: {default})",
            )


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from mllm.inference import Processor
    from mllm.serve.app import ServeConfig, Server, build_app
    from mllm.serve.protocol import Limits

    limits = Limits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Limits)})
    config = ServeConfig(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig) if f.name != "limits"},
        limits=limits,
    )
    if config.image_dir is not None and not os.path.isdir(config.image_dir):
        raise UserError(f"--image-dir {config.image_dir}: no such directory")
    model, processor = load_model(args)
    name = config.model_name or os.path.basename(os.path.normpath(processor.config["_path"]))
    checker = Processor.from_checkpoint(model, processor.config)  # the event loop's own tokenizer
    server = Server(model, processor, checker, config, name)
    print(
        f"mllm serve: {name} on http://{config.host}:{config.port}/ (API: /v1/chat/completions)", flush=True
    )
    uvicorn.run(build_app(server), host=config.host, port=config.port, log_level="warning")
    return 0
