"""lmms-eval's own evaluation loop (its CLI) with `--model mllm` on a local task from files on disk, no hub.

The same checkpoint exported to hf-llava and run through lmms-eval's `llava_hf` model gives the same answers and
score. Multiple choice (`loglikelihood`) is checked against the exported transformers model's own logits, by
calling the adapter: lmms-eval 0.7.3's loop turns every model's loglikelihood pairs into strings
(`unwrap_generation_output` → `str(output)`), so no model can run a multiple_choice task through it.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import make_checkpoint, make_image, never_stop

pytestmark = pytest.mark.slow
QUESTION = "What shape is in the image?"
CHOICES = ["red", "green", "blue", "yellow"]

UTILS = '''
"""Local test tasks: images next to this file, answers scored by string similarity (nonzero for any model)."""
import difflib
import os

from PIL import Image


def doc_to_visual(doc):
    return [Image.open(os.path.join(os.path.dirname(__file__), doc["image"])).convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def doc_to_choice(doc):
    return {choices}


def process_results(doc, results):
    return {{"similarity": difflib.SequenceMatcher(None, results[0].strip(), doc["answer"]).ratio()}}
'''

VQA_YAML = """
task: mllm_local_vqa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root}/vqa.jsonl
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 12
  temperature: 0
  until: ["\\n\\n"]
process_results: !function utils.process_results
metric_list:
  - metric: similarity
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""

CHOICE_YAML = """
task: mllm_local_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root}/choice.jsonl
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_choice: !function utils.doc_to_choice
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms_tasks")
    (root / "utils.py").write_text(textwrap.dedent(UTILS.format(choices=CHOICES)))
    (root / "vqa.yaml").write_text(VQA_YAML.format(root=root))
    (root / "choice.yaml").write_text(CHOICE_YAML.format(root=root))
    with open(root / "vqa.jsonl", "w") as vqa, open(root / "choice.jsonl", "w") as choice:
        for i in range(4):
            make_image(20 + i).save(root / f"img{i}.png")
            doc = {"id": i, "image": f"img{i}.png"}
            vqa.write(json.dumps({**doc, "question": QUESTION, "answer": "a red circle"}) + "\n")
            choice.write(json.dumps({**doc, "question": "What colour is it?", "label": i % 4}) + "\n")
    return root


@pytest.fixture(scope="module")
def ckpt_and_export(tmp_path_factory, backbones):
    from mllm.cli import main
    from mllm.config import ConnectorConfig, LLMConfig, ModelConfig, VisionConfig

    cfg = ModelConfig(
        vision=VisionConfig(path=backbones["clip"]),
        connector=ConnectorConfig(kind="mlp"),
        llm=LLMConfig(path=backbones["llama"], mode="full"),
        dtype="fp32",
    )
    d = tmp_path_factory.mktemp("lmms_ckpt")
    ckpt = make_checkpoint(d / "ckpt", cfg, seed=2, edit=never_stop)
    assert main(["export", ckpt, str(d / "llava"), "--format", "hf-llava"]) == 0
    return ckpt, str(d / "llava")


def _lmms_eval(model: str, model_args: str, tasks: str, task_dir, out) -> dict:
    """Run the `lmms-eval` command; returns {task: (results, samples)}."""
    cli = os.path.join(os.path.dirname(sys.executable), "lmms-eval")
    args = [
        cli,
        "--model",
        model,
        "--model_args",
        model_args,
        "--tasks",
        tasks,
        "--include_path",
        str(task_dir),
    ]
    args += ["--batch_size", "2" if model == "mllm" else "1", "--output_path", str(out), "--log_samples"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    found = glob.glob(f"{out}/*/*_results.json")  # lmms-eval exits 0 even when the evaluation failed
    open(f"{out}.log", "w").write(run.stdout + run.stderr)
    assert run.returncode == 0 and len(found) == 1, run.stdout[-3000:] + run.stderr[-3000:]
    results_file = found[0]
    results = json.load(open(results_file))["results"]
    found = {}
    for task in tasks.split(","):
        (samples_file,) = glob.glob(f"{out}/*/*_samples_{task}.jsonl")
        samples = sorted((json.loads(line) for line in open(samples_file)), key=lambda s: s["doc_id"])
        found[task] = (results[task], samples)
    return found


def _hf_choice_logprobs(hf, processor, image, question: str) -> list[float]:
    """Sum of log-probabilities of each choice as the answer, from the exported transformers model alone."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    out = []
    for choice in CHOICES:
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        cont = processor.tokenizer(f" {choice}", add_special_tokens=False, return_tensors="pt")["input_ids"]
        ids = torch.cat([inputs["input_ids"], cont], dim=1)
        with torch.no_grad():
            logits = hf(input_ids=ids, pixel_values=inputs["pixel_values"]).logits
        logprobs = logits[0, -cont.shape[1] - 1 : -1].log_softmax(-1)
        out.append(logprobs.gather(-1, cont[0][:, None]).sum().item())
    return out


def test_lmms_eval_runs_mllm_and_matches_the_hf_llava_export(task_dir, ckpt_and_export, tmp_path):

    ckpt, export = ckpt_and_export
    ours = _lmms_eval("mllm", f"pretrained={ckpt},device=cpu", "mllm_local_vqa", task_dir, tmp_path / "a")
    hf = _lmms_eval(
        "llava_hf",
        f"pretrained={export},device=cpu,device_map=cpu,dtype=float32",
        "mllm_local_vqa",
        task_dir,
        tmp_path / "b",
    )

    # free-form answers: the same text for every document, so the same score
    (our_vqa, our_samples), (hf_vqa, hf_samples) = ours["mllm_local_vqa"], hf["mllm_local_vqa"]
    answers = [s["filtered_resps"] for s in our_samples]
    assert all(answers) and len(set(answers)) > 1, answers
    assert answers == [s["filtered_resps"].strip() for s in hf_samples]
    assert (
        our_vqa["similarity,none"] == pytest.approx(hf_vqa["similarity,none"])
        and our_vqa["similarity,none"] > 0
    )


def test_loglikelihood_matches_the_hf_llava_export(task_dir, ckpt_and_export):
    """Each choice's loss, as lmms-eval asks for it, equals the exported transformers model's."""
    from lmms_eval.api.instance import Instance
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from mllm.harness.lmms_eval import MllmModel

    ckpt, export = ckpt_and_export
    hf = LlavaForConditionalGeneration.from_pretrained(export, dtype=torch.float32).eval()
    hf_processor = AutoProcessor.from_pretrained(export)
    docs = [json.loads(line) for line in open(task_dir / "choice.jsonl")]
    model = MllmModel(pretrained=ckpt, device="cpu")
    model.task_dict = {"choice": {"test": docs}}

    def visual(doc):
        return [Image.open(task_dir / doc["image"]).convert("RGB")]

    for doc_id, doc in enumerate(docs[:2]):
        requests = [
            Instance(
                "loglikelihood",
                (doc["question"], f" {c}", visual, doc_id, "choice", "test"),
                idx=k,
                metadata={"task": "choice", "doc_id": doc_id, "repeats": 1},
            )
            for k, c in enumerate(CHOICES)
        ]
        got = model.loglikelihood(requests)
        expected = [-lp for lp in _hf_choice_logprobs(hf, hf_processor, visual(doc)[0], doc["question"])]
        assert [loss for loss, _ in got] == pytest.approx(expected, abs=1e-3)
        assert all(loss > 0 for loss, _ in got) and isinstance(got[0][1], bool)
