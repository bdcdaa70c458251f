"""The demo's schedules (quick | default | full) and per-connector settings, as typed dataclasses.

Every number the demo trains with lives here and is written into results.json,
so a result always says what produced it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from mllm.demo.data import DemoData

CONNECTORS = ("mlp", "qformer", "resampler")


@dataclass
class StageSettings:
    """One training stage, as `mllm train` options."""

    steps: int
    micro_batch_size: int
    lr: float
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    connector_lr: float = 0.0
    """Stage 2: the connector's own peak learning rate (0 = `lr`). The demo keeps it 10× below the LoRA's, so
    that stage 2 refines what stage 1 taught the connector rather than overwriting it (measured: docs/demo.md)."""

    def __post_init__(self):
        if self.steps < 1 or self.micro_batch_size < 1 or self.grad_accum < 1 or not self.lr > 0:
            raise ValueError(f"a stage needs steps, micro_batch_size, grad_accum >= 1 and lr > 0: {self}")


@dataclass
class DemoSettings:
    """A whole demo run: data sizes, model shape, the two stages, evaluation."""

    schedule: str
    connector: str = "mlp"
    data: DemoData = field(default_factory=DemoData)
    vision_pool: int = 3
    """`mlp`: average-pool EfficientNet's 7×7 grid by 3 → 3×3 = 9 visual tokens per image."""
    num_queries: int = 9
    """`qformer` / `resampler`: learned queries = visual tokens per image (they read all 49 patches)."""
    connector_width: int = 0
    """`qformer` / `resampler`: internal width (0 = the tower's feature width)."""
    connector_layers: int = 2
    """`qformer` / `resampler`: transformer layers."""
    stage1: StageSettings = field(
        default_factory=lambda: StageSettings(steps=120, micro_batch_size=32, lr=2e-3)
    )
    stage2: StageSettings = field(
        default_factory=lambda: StageSettings(steps=320, micro_batch_size=16, lr=1e-3, connector_lr=1e-4)
    )
    lora_r: int = 32
    lora_alpha: int = 64
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """The LLM modules stage 2 adapts (`mllm train --lora-target-modules`): attention only. On a CPU a rank-32
    adapter doubles the cost of each bf16 linear it sits on, and adapting every linear layer bought no accuracy
    (measured: docs/demo.md)."""
    eval_batch_size: int = 32
    seed: int = 0
    qformer_pretrain: bool = False
    """The BLIP-2 route (`--qformer-pretrain`, connector qformer): a text-aware Q-Former initialised from
    all-MiniLM-L6-v2 (its width and layers, not `connector_width` / `connector_layers`) is first pretrained on the
    stage-1 captions against the tower alone (`mllm train --stage 0`: ITC + ITM + ITG); stage 1 starts from it."""
    stage0: StageSettings = field(
        default_factory=lambda: StageSettings(steps=45, micro_batch_size=16, lr=1e-3, warmup_ratio=0.1)
    )
    """Q-Former pretraining (with `qformer_pretrain`)."""
    instruction_aware: bool = False
    """The InstructBLIP route (`--instruction-aware`, with `qformer_pretrain`): stage 2 feeds each question into
    the pretrained Q-Former beside its queries."""
    mir_every: int = 40
    """Stage 1 measures the Modality Integration Rate on the validation captions before its first step, every
    this many steps and at its end (`mllm train --mir-every`); 0 = not at all."""

    def __post_init__(self):
        if self.connector not in CONNECTORS:
            raise ValueError(f"demo connector must be one of {CONNECTORS}, got {self.connector!r}")
        if self.qformer_pretrain and self.connector != "qformer":
            raise ValueError(
                "--qformer-pretrain is the BLIP-2 route of the qformer connector: add --connector qformer"
            )
        if self.instruction_aware and not self.qformer_pretrain:
            raise ValueError(
                "--instruction-aware needs the text-aware Q-Former of the BLIP-2 route: add --connector qformer "
                "--qformer-pretrain"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def pool(self) -> int:
        """The tower's pooling: the mlp projector maps each pooled patch to a token; the query connectors read all 49."""
        return self.vision_pool if self.connector == "mlp" else 1


QUERY_CONNECTOR_WIDTH = 256
"""`qformer` / `resampler` width in the demo: at the tower's own width (1,280) the Q-Former was slower and still
could not name colours after the mlp's stage 1 (docs/measurements.md)."""


def demo_settings(
    schedule: str = "default",
    connector: str = "mlp",
    qformer_pretrain: bool = False,
    instruction_aware: bool = False,
) -> DemoSettings:
    """The named schedule: `quick` (CI: minutes, any accuracy), `default` (≤ 20 min on 2 CPU cores), `full` (longer).

    The query connectors (`qformer`, `resampler`) are small transformers trained from scratch: they get a narrow
    width and a gentler stage-1 start (lr 1e-3, 10% warm-up) than the mlp projector's.
    """
    settings = dataclasses.replace(
        _schedule(schedule, connector), qformer_pretrain=qformer_pretrain, instruction_aware=instruction_aware
    )  # (checked again by __post_init__)
    if schedule == "quick":
        settings.stage0 = StageSettings(steps=2, micro_batch_size=4, lr=5e-4)
    if connector != "mlp":
        settings.connector_width = QUERY_CONNECTOR_WIDTH
        settings.stage1.lr = min(settings.stage1.lr, 1e-3)
        settings.stage1.warmup_ratio = 0.1
    if connector == "resampler" and schedule == "default":
        # slower to align than the Q-Former: 120 stage-1 steps leave it short (docs/measurements.md)
        settings.stage1.steps = 180
    return settings


CONVERSATIONS = {"questions_per_sample": 3, "multi_turn": 0.3, "switch": 0.2}
"""Stage 2's conversations in every schedule: 30% ask 2-3 questions about their image, 20% go on about another
image (measured in docs/demo.md: questions asked as a later turn or after a switch)."""


def _schedule(schedule: str, connector: str) -> DemoSettings:
    if schedule == "quick":
        return DemoSettings(
            schedule,
            connector,
            data=DemoData(
                train_images=24, val_questions=24, test_questions=24, text_yes_no=1.0, **CONVERSATIONS
            ),
            # enough steps for the quick demo test to see learning (stage 1's caption loss falls ~2x), no more
            stage1=StageSettings(steps=16, micro_batch_size=8, lr=2e-3),
            stage2=StageSettings(steps=8, micro_batch_size=4, lr=1e-3, connector_lr=1e-4),
            lora_r=4,
            lora_alpha=8,
            eval_batch_size=16,
            mir_every=8,
        )
    if schedule == "default":
        return DemoSettings(
            schedule,
            connector,
            data=DemoData(balance_yes_no=False, text_yes_no=1.0, **CONVERSATIONS),
        )
    if schedule == "full":
        return DemoSettings(
            schedule,
            connector,
            data=DemoData(test_questions=2000, balance_yes_no=False, text_yes_no=1.0, **CONVERSATIONS),
            stage1=StageSettings(steps=600, micro_batch_size=32, lr=2e-3),
            stage2=StageSettings(steps=3000, micro_batch_size=16, lr=1e-3, connector_lr=1e-4),
        )
    raise ValueError(f"demo schedule must be quick|default|full, got {schedule!r}")
