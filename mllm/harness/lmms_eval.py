"""An lmms-eval model for mllm checkpoints of every connector: `lmms-eval --model mllm --model_args pretrained=CKPT`.

lmms-eval finds it through the `lmms_eval.models` entry point in pyproject.toml (`manifest` below). Prompts are
built by the checkpoint's own `Processor` and answered by `generate_batch`, exactly as `mllm chat` answers them.

model_args: `pretrained` (checkpoint or training output directory), `device`, `dtype`, `batch_size`,
`keep_adapters` (run LoRA unmerged).
"""

from __future__ import annotations

import json
from collections import defaultdict

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from PIL import Image

from mllm.inference import Conversation, SamplingConfig, generate_batch, load_pretrained
from mllm.inference.generate import batched, cut_at_stop


def manifest() -> ModelManifest:
    """What the `lmms_eval.models` entry point hands lmms-eval: the model id `mllm` and its class."""
    return ModelManifest(model_id="mllm", simple_class_path="mllm.harness.lmms_eval.MllmModel")


def _flag(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


class MllmModel(lmms):
    """`generate_until` (free-form answers, batched) and `loglikelihood` (multiple choice) over one checkpoint."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str = 8,
        keep_adapters: bool | str = False,
        **unused,
    ) -> None:
        super().__init__()
        self.model, self.processor = load_pretrained(
            pretrained, dtype=dtype, device=device, merge_adapters=not _flag(keep_adapters)
        )
        self.batch_size_per_gpu = int(batch_size)

    def _visuals(self, request: Instance) -> list[Image.Image]:
        _, _, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
        for v in visuals:
            if not isinstance(v, Image.Image):
                raise ValueError(f"task {task}: mllm answers about images; got a {type(v).__name__} visual")
        return list(visuals)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy (or sampled, per the task's generation_kwargs) answers, cut at the task's `until` strings."""
        answers: list[str | None] = [None] * len(requests)
        groups = defaultdict(list)  # requests with the same generation settings share batches
        for i, r in enumerate(requests):
            groups[json.dumps(r.args[1], sort_keys=True, default=str)].append(i)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sampling = SamplingConfig(
                max_new_tokens=int(kwargs.get("max_new_tokens", 256)),
                temperature=float(kwargs.get("temperature") or 0.0),
                top_p=float(kwargs.get("top_p") or 1.0),
            )
            for chunk in batched(indices, self.batch_size_per_gpu):
                convs = [Conversation.single(requests[i].args[0], self._visuals(requests[i])) for i in chunk]
                for i, text in zip(
                    chunk, generate_batch(self.model, self.processor, convs, sampling), strict=True
                ):
                    answers[i] = cut_at_stop(text, until)[0].strip()
        return answers

    @torch.inference_mode()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Per request: the continuation's loss as the answer (summed negative log-probability), and whether greedy
        decoding would produce it.

        A loss, not a log-probability: lmms-eval's multiple-choice scorer picks the choice with the *smallest*
        value (`np.argmin`, "we return the actual loss"), as its own llava_hf model returns.
        """
        results = []
        for r in requests:
            context, target, _, doc_id, task, split = r.args
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            results.append(
                self._continuation_logprob(Conversation.single(context, self._visuals(r)), continuation)
            )
        return results

    def _continuation_logprob(self, conv: Conversation, continuation: str) -> tuple[float, bool]:
        batch = self.processor(
            [conv]
        )  # the prompt up to the assistant's turn, images placed as in generation
        cont = self.processor.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        device = next(self.model.llm.parameters()).device
        ids = torch.cat([batch["input_ids"], torch.tensor([cont])], dim=1).to(device)
        pixels = batch["pixel_values"].to(device) if batch["pixel_values"] is not None else None
        logits = self.model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=pixels,
            image_counts=batch["image_counts"],
            image_sizes=batch["image_sizes"],
            return_logits=True,
        ).logits  # [1, T, V]
        logprobs = logits[0, -len(cont) - 1 : -1].float().log_softmax(-1)  # position t predicts token t + 1
        target = torch.tensor(cont, device=device)
        loss = -logprobs.gather(-1, target[:, None]).sum().item()
        return loss, bool((logprobs.argmax(-1) == target).all())

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(
            "mllm's lmms-eval model answers single-round tasks (generate_until, loglikelihood)"
        )
