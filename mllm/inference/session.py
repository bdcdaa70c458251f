"""`ChatSession`: a multi-turn conversation with images attached at any turn, and its JSON transcript."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from mllm.config import IMAGE_PLACEHOLDER
from mllm.inference.generate import SamplingConfig, generate_batch
from mllm.inference.images import load_image
from mllm.inference.processor import Conversation, Message, Processor


@dataclass
class _Turn:
    role: str
    content: str
    images: list[str] = field(default_factory=list)
    """Paths of the images this turn carries (its placeholders, in order)."""


class ChatSession:
    """History of turns; images attached before a user message go with that message, one placeholder each."""

    def __init__(
        self, model, processor: Processor, sampling: SamplingConfig | None = None, system: str | None = None
    ):
        self.model = model
        self.processor = processor
        self.sampling = sampling or SamplingConfig()
        self.system = system
        self.turns: list[_Turn] = []
        self.pending: list[tuple[str, Image.Image]] = []
        self._loaded: dict[str, Image.Image] = {}

    def attach(self, path: str | os.PathLike) -> None:
        """Open the image now (so a bad file is reported at once) and send it with the next message."""
        image = load_image(path)
        self.pending.append((os.fspath(path), image))

    def reset(self) -> None:
        """Forget the history and any pending images (the system prompt stays)."""
        self.turns.clear()
        self.pending.clear()
        self._loaded.clear()

    def set_system(self, text: str | None) -> None:
        self.system = text or None

    def ask(self, text: str, streamer=None) -> str:
        """Add a user message (with the pending images), generate the answer, and record it."""
        attached = list(self.pending)
        paths = [p for p, _ in attached]
        self._loaded.update(attached)
        prefix = f"{IMAGE_PLACEHOLDER}\n" * len(paths) if IMAGE_PLACEHOLDER not in text else ""
        self.turns.append(_Turn("user", prefix + text, paths))
        self.pending.clear()
        try:
            answer = generate_batch(
                self.model, self.processor, [self.conversation()], self.sampling, streamer
            )[0]
        except BaseException:  # an error or Ctrl-C mid-answer: the unanswered turn leaves no trace
            self.turns.pop()
            self.pending = attached
            raise
        self.turns.append(_Turn("assistant", answer))
        return answer

    def conversation(self) -> Conversation:
        messages: list[Message] = [{"role": "system", "content": self.system}] if self.system else []
        messages += [{"role": t.role, "content": t.content} for t in self.turns]
        images = [self._loaded[p] for t in self.turns for p in t.images]
        return Conversation(messages, images)

    def transcript(self) -> dict:
        return {
            "system": self.system,
            "sampling": vars(self.sampling),
            "turns": [{"role": t.role, "content": t.content, "images": t.images} for t in self.turns],
        }

    def save(self, path: str | os.PathLike) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.transcript(), indent=2))
        return p
