"""`mllm chat CKPT`: an interactive, streaming REPL with images attachable at any turn, or a one-shot answer.

Everything about the model (backbones, template, image settings, system prompt) comes from the
checkpoint's saved config.
"""

from __future__ import annotations

# Heavy modules (torch, transformers, the model) are imported inside the functions that need them, when the
# command runs: parsing arguments and `--help` stay instant.
import argparse
import json
import shlex
import sys

from mllm.cli import UserError
from mllm.cli.options import add_model_arguments, load_model

HELP = """commands:
  /image PATH [PATH ...]  attach image(s) to your next message (several per turn are fine)
  /reset                  forget the conversation and pending images
  /system TEXT            set the system prompt (/system alone: back to the checkpoint's)
  /save FILE              write the transcript as JSON
  /help                   this list
  /quit                   leave (Ctrl-D too)"""

PROMPT = ">>> "


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH",
        help="image for the first message (repeatable)",
    )
    p.add_argument("--prompt", help="one-shot: answer this prompt, print only the answer, exit")
    p.add_argument(
        "--json", action="store_true", help="one-shot: print a JSON record instead of the bare answer"
    )
    p.add_argument("--system", help="system prompt (default: the checkpoint's)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (temperature > 0)")
    p.add_argument("--max-new-tokens", type=int, default=256)


def run(args: argparse.Namespace) -> int:
    from mllm.inference import ChatSession, SamplingConfig, load_image

    if args.json and args.prompt is None:
        raise UserError("--json needs --prompt (one-shot mode)")
    for path in args.image:
        load_image(path)  # a bad image is reported before the model takes seconds to load
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_p)
    model, processor = load_model(args)
    session = ChatSession(model, processor, sampling, system=args.system)
    for path in args.image:
        session.attach(path)
    if args.prompt is not None:
        return _one_shot(session, args)
    return Repl(session, args.checkpoint).loop()


def _one_shot(session, args: argparse.Namespace) -> int:
    answer = session.ask(args.prompt)
    if args.json:
        record = {
            "checkpoint": args.checkpoint,
            "images": args.image,
            "prompt": args.prompt,
            "answer": answer,
        }
        print(json.dumps({**record, "sampling": vars(session.sampling)}))
    else:
        print(answer)
    return 0


class Repl:
    """Reads lines; `/commands` change the session, anything else is a message answered with streaming."""

    def __init__(self, session, checkpoint: str):
        self.session = session
        self.checkpoint = checkpoint
        self.commands = {
            "/image": self.image,
            "/reset": self.reset,
            "/system": self.system,
            "/save": self.save,
            "/help": self.help,
        }

    def loop(self) -> int:
        from mllm.inference import StreamPrinter

        processor = self.session.processor
        print(
            f"mllm chat: {self.checkpoint} (template {processor.template!r}). /help for commands, /quit to leave."
        )
        for path, _ in self.session.pending:
            print(f"[image attached: {path}]")
        while True:
            try:
                line = input(PROMPT).strip()
            except EOFError:
                print()
                return 0
            if not line:
                continue
            if line in ("/quit", "/exit"):
                return 0
            try:
                if line.startswith("/"):
                    self.command(line)
                else:
                    self.session.ask(line, streamer=StreamPrinter(processor.tokenizer, sys.stdout))
            # A bad image, an unknown command, an unwritable file: say so and keep chatting.
            except (ValueError, OSError) as e:
                print(f"error: {e}")
            except KeyboardInterrupt:
                print("\n[interrupted]")

    def command(self, line: str) -> None:
        name, _, rest = line.partition(" ")
        if name not in self.commands:
            raise ValueError(f"unknown command {name}; /help lists them")
        self.commands[name](rest.strip())

    def image(self, rest: str) -> None:
        paths = shlex.split(rest)
        if not paths:
            raise ValueError("usage: /image PATH [PATH ...]")
        for path in paths:
            self.session.attach(path)
            print(f"[image attached: {path}; {len(self.session.pending)} pending for your next message]")

    def reset(self, rest: str) -> None:
        self.session.reset()
        print("[conversation reset]")

    def system(self, rest: str) -> None:
        self.session.set_system(rest or None)
        print(f"[system prompt: {rest!r}]" if rest else "[system prompt: the checkpoint's]")

    def save(self, rest: str) -> None:
        if not rest:
            raise ValueError("usage: /save FILE")
        print(f"[transcript saved to {self.session.save(rest)}]")

    def help(self, rest: str) -> None:
        print(HELP)
