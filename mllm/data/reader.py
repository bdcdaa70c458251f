"""`SampleReader`: (source, record index) → a validated sample, its token ids and loss mask, and its images.

Every path from a recipe to a sample goes through here (the length scan, the dataset, `mllm data check`,
`mllm data show`, the feature cache): the system prompt, validation and where image paths start are decided once.
"""

from __future__ import annotations

from PIL import Image

from mllm.data.encode import ConversationEncoder, Encoded
from mllm.data.errors import BadSampleError
from mllm.data.images import image_size, open_image, resolve_image_path
from mllm.data.layout import ImageLayout
from mllm.data.recipe import Recipe
from mllm.data.sample import ImageRef, Sample, validate
from mllm.data.sources import Source, open_source


class SampleReader:
    """Everything needed to turn (source, record index) into a validated, encoded sample and its images."""

    def __init__(
        self,
        recipe: Recipe,
        sources: list[Source],
        encoder: ConversationEncoder,
        layout: ImageLayout | None = None,
    ):
        self.recipe = recipe
        self.sources = sources
        self.encoder = encoder
        self.layout = layout or ImageLayout.fixed(encoder.image_tokens)
        """How each image becomes visual tokens; when counts depend on the image, its header is read (no decoding)."""

    def sample(self, si: int, idx: int) -> Sample:
        """The validated, normalised sample (system prompt applied) at record `idx` of source `si`."""
        sample = self.sources[si].sample(idx)
        if self.recipe.system_prompt and not any(m["role"] == "system" for m in sample.messages):
            sample.messages.insert(0, {"role": "system", "content": self.recipe.system_prompt})
        validate(sample)
        return sample

    def encode(self, si: int, idx: int) -> tuple[Sample, Encoded]:
        sample = self.sample(si, idx)
        return sample, self.encoder.encode_full(sample.messages, image_tokens=self.image_tokens(sample, si))

    def image_tokens(self, sample: Sample, si: int) -> list[int]:
        """Each image's visual-token count, from its header alone (the budgets applied; BadSampleError past them)."""
        if not self.layout.varies:
            return self.layout.token_counts([(1, 1)] * len(sample.images))
        root = self.image_root(si)
        return self.layout.token_counts(
            [image_size(ref, root, self.recipe.max_image_pixels) for ref in sample.images]
        )

    def image_root(self, si: int) -> str:
        """Where source `si`'s relative image paths start (`Recipe.image_root_of`)."""
        return self.recipe.image_root_of(self.sources[si].spec)

    def image_paths(self, sample: Sample, si: int, n: int | None = None) -> list[ImageRef]:
        """The first `n` (None: all) images of `sample` from source `si`, without decoding them: a path becomes
        absolute (checked to stay inside the image root, else BadSampleError), bytes pass through unchanged."""
        root = self.image_root(si)
        refs = sample.images if n is None else sample.images[:n]
        return [resolve_image_path(root, r) if isinstance(r, str) else r for r in refs]

    def load_images(self, sample: Sample, si: int, expected: list[int] | None = None) -> list[Image.Image]:
        """The sample's images, decoded as training sees them (RGB, upright; missing/oversized → BadSampleError),
        checked against the image budgets and, given `expected`, against the token counts their headers gave
        (`Encoded.image_tokens`)."""
        root = self.image_root(si)
        images = [open_image(ref, root, self.recipe.max_image_pixels) for ref in sample.images]
        counts = self.layout.token_counts([im.size for im in images])
        if expected is not None and counts != expected:
            raise BadSampleError(
                "image_size_mismatch",
                f"decoded, its images need {counts} visual tokens but their headers said {expected} "
                f"(sizes {[im.size for im in images]}); was an image replaced during the run?",
            )
        return images

    def locate(self, e: BadSampleError, si: int, idx: int) -> BadSampleError:
        src = self.sources[si]
        return e.located(source=src.name, index=idx, line=src.line(idx), sample_id=src.raw_id(idx))


def as_layout(image_tokens: int | ImageLayout) -> ImageLayout:
    """A model's `ImageLayout`, or one fixed count of visual tokens per image (a square layout without a tower)."""
    return image_tokens if isinstance(image_tokens, ImageLayout) else ImageLayout.fixed(image_tokens)


def open_reader(recipe: Recipe, tokenizer, image_tokens: int | ImageLayout) -> SampleReader:
    """Open every source of `recipe` and the encoder for `tokenizer`; `image_tokens`: the model's `image_layout`,
    or one count of visual tokens per image placeholder."""
    layout = as_layout(image_tokens)
    sources = [open_source(spec) for spec in recipe.sources]
    encoder = ConversationEncoder(tokenizer, recipe.template, layout.tile_tokens, recipe.max_length)
    return SampleReader(recipe, sources, encoder, layout)
