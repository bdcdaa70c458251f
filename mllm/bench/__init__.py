"""Side-by-side training benchmark: `mllm train` vs transformers' LlavaForConditionalGeneration + Trainer.

rows.py       what each row trains on both sides (stage 1 connector; stage 2 full LLM; stage 2 LoRA) and its target
work.py       the benchmark work on disk and the data recipe both sides read
product.py    the mllm side: `mllm.train.loop.setup` + `train_step` (what `mllm train` runs), timed, no checkpoints
reference.py  the reference side: LLaVA assembled from the same backbones, trained by transformers.Trainer
meter.py      step timing after warm-up, tokens, padding, data waits, CPU time and peak RSS (both sides)
flops.py      FLOPs of the standard computation (same for both sides) and the measured matmul peak
report.py     MFU, per-round ratios, their median and spread, the verdict against the targets, the printed tables
side.py       one side in its own process(es) (`python -m mllm.bench.side`), launched by scripts/bench.py
tiny_work.py  a tiny work in the same layout, for tests and `scripts/bench.py --quick`
"""
