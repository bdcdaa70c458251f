"""Side-by-side training benchmark: mllm vs transformers' LlavaForConditionalGeneration + Trainer.

work.py       the benchmark work on disk and its stage data (tokenised by mllm.data for both sides)
reference.py  the reference side: LLaVA assembled from the same backbones, trained by transformers.Trainer
ours.py       the mllm side: MultimodalLM + mllm.data + an in-process optimizer loop, with its `Levers`
meter.py      step timing after warm-up, tokens, padding, data waits, CPU time and peak RSS (both sides)
flops.py      FLOPs of the standard computation (same for both sides) and the measured matmul peak
report.py     MFU, ratios, verdict against the targets, the printed tables
side.py       one side in its own process (`python -m mllm.bench.side`), launched by scripts/bench.py
tiny_work.py  a tiny work in the same layout, for tests
"""
