"""How an image becomes tower inputs and visual tokens: `square`, `pad` or `anyres` (LLaVA-NeXT), with pixel budgets.

Everything here is arithmetic on an image's (width, height), so the number of
visual tokens of each image is known from its file header alone, before any
decoding or batching (`ImageLayout.num_tokens`). The same `ImageLayout`, built
from the checkpoint's `VisionConfig`, serves training, `mllm data check`,
evaluation and chat, so the budgets and tiling are applied identically
everywhere.

- `square`: the image goes to the tower's own processor (which squashes or
  crops it to its square); one tile, `tile_tokens` tokens.
- `pad`: the image is first padded to a square with the tower's mean colour
  (LLaVA-1.5 `expand2square`), so nothing is cropped or squashed; one tile.
- `anyres`: LLaVA-NeXT. The best-fitting grid resolution is chosen from
  `grid_pinpoints` (transformers' `select_best_resolution`), the image is
  resized into it keeping its aspect ratio and padded, and cut into tower-sized
  tiles; a squashed global thumbnail goes first. After the connector, the
  thumbnail's tokens come first, then the tiles' tokens as one feature map with
  the padding cut away and one `image_newline` token after every row
  (`arrange`, the order of transformers' `LlavaNextModel.pack_image_features`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from PIL import Image
from transformers.image_processing_utils import select_best_resolution

from mllm.data.errors import BadSampleError
from mllm.registry import Registry

MAX_ASPECT_RATIO = 100
"""Longest over shortest side above which an image is refused (a 1×10,000 strip is no picture to tile)."""


def default_pinpoints(tile: int, max_tiles: int) -> list[list[int]]:
    """Every grid of at most `max_tiles` tiles, as (height, width) in pixels (LLaVA-NeXT's pinpoint list form)."""
    return [
        [rows * tile, cols * tile]
        for rows in range(1, max_tiles + 1)
        for cols in range(1, max_tiles + 1)
        if rows * cols <= max_tiles
    ]


def unpadded_shape(width: int, height: int, rows: int, cols: int) -> tuple[int, int]:
    """The (rows, cols) of a `rows`×`cols` feature map that show the image, once the letterbox padding is cut.

    Exactly transformers' `unpad_image` (llava_next), which the token count and `arrange` both use.
    """
    if width / height > cols / rows:
        new_rows = int(round(height * (cols / width), 7))
        return rows - 2 * ((rows - new_rows) // 2), cols
    new_cols = int(round(width * (rows / height), 7))
    return rows, cols - 2 * ((cols - new_cols) // 2)


@dataclass(frozen=True)
class ImageLayout:
    """The tiling and token arithmetic of one model (see the module doc). Sizes are (width, height) in pixels."""

    aspect: str = "square"
    tile_tokens: int = 0
    """Visual tokens per tile after the connector (a square grid for `anyres`)."""
    tile_size: int = 0
    """Side of the tower's square input, in pixels (0: unknown; then only `square` counts work)."""
    grid_pinpoints: tuple[tuple[int, int], ...] = ()
    """`anyres`: the grid resolutions an image may be resized to, (height, width) in pixels."""
    min_pixels: int = 0
    """Images with fewer pixels are upscaled (keeping their aspect ratio) to at least this many; 0 = off."""
    max_pixels: int = 0
    """Images with more pixels are downscaled to at most this many; 0 = off."""
    max_image_tokens: int = 0
    """A sample whose images need more visual tokens than this is refused (BadSampleError); 0 = no limit."""
    fill: tuple[int, int, int] = (0, 0, 0)
    """`pad`: the colour of the padding (the tower's mean)."""

    def __post_init__(self):
        ASPECTS.get(self.aspect)
        if self.tile_tokens < 0 or self.min_pixels < 0 or self.max_pixels < 0 or self.max_image_tokens < 0:
            raise ValueError("tile_tokens, min_pixels, max_pixels and max_image_tokens must be >= 0")
        if self.max_pixels and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels {self.min_pixels} > max_pixels {self.max_pixels}")

    @classmethod
    def fixed(cls, tokens: int) -> ImageLayout:
        """`square` with a known token count and no tower: what a bare `image_tokens=k` means."""
        return cls("square", tile_tokens=tokens)

    @property
    def varies(self) -> bool:
        """Whether token counts depend on the image (then the length scan reads each image's header)."""
        return ASPECTS.get(self.aspect).varies or bool(self.min_pixels or self.max_pixels)

    @property
    def grid_side(self) -> int:
        side = math.isqrt(self.tile_tokens)
        if side * side != self.tile_tokens:
            raise ValueError(f"anyres needs a square grid of tokens per tile, got {self.tile_tokens}")
        return side

    # ---- sizes -----------------------------------------------------------------------------------
    def fit(self, width: int, height: int) -> tuple[int, int]:
        """The size an image of (width, height) is used at: checked, then scaled into [min_pixels, max_pixels].

        Raises BadSampleError for a zero-sized image or one more than MAX_ASPECT_RATIO times longer than wide.
        """
        if width < 1 or height < 1:
            raise BadSampleError("zero_sized_image", f"image is {width}x{height} pixels")
        if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            raise BadSampleError(
                "extreme_aspect_ratio",
                f"image is {width}x{height} pixels, more than {MAX_ASPECT_RATIO}:1; crop or pad it first",
            )
        pixels = width * height
        if self.max_pixels and pixels > self.max_pixels:
            scale = math.sqrt(self.max_pixels / pixels)
            return max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
        if self.min_pixels and pixels < self.min_pixels:
            scale = math.sqrt(self.min_pixels / pixels)
            return math.ceil(width * scale), math.ceil(height * scale)
        return width, height

    def num_tiles(self, size: tuple[int, int]) -> int:
        """Tower inputs of an image of `size` (already `fit`)."""
        return ASPECTS.get(self.aspect).num_tiles(self, *size)

    def num_tokens(self, size: tuple[int, int]) -> int:
        """Visual tokens of an image of `size` (already `fit`) in the LLM sequence."""
        return ASPECTS.get(self.aspect).num_tokens(self, *size)

    def token_counts(self, sizes: list[tuple[int, int]]) -> list[int]:
        """Each image's visual tokens, from the raw (width, height) of a sample's images, in order.

        Raises BadSampleError for a bad size (see `fit`) or when their sum exceeds `max_image_tokens`.
        """
        counts = [self.num_tokens(self.fit(*s)) for s in sizes]
        if self.max_image_tokens and sum(counts) > self.max_image_tokens:
            raise BadSampleError(
                "image_token_budget",
                f"its {len(counts)} image(s) need {sum(counts)} visual tokens ({counts}), more than "
                f"max_image_tokens={self.max_image_tokens}; lower max_pixels / max_tiles or raise the budget",
            )
        return counts

    # ---- pixels ----------------------------------------------------------------------------------
    def pixels(self, images: list[Image.Image], preprocess) -> tuple[torch.Tensor, torch.Tensor]:
        """RGB images → (tower inputs of all their tiles [T, 3, S, S], the size each image was used at [I, 2]).

        `preprocess` is the tower's own (tiles → normalised pixel values); tiles of one image are consecutive.
        """
        aspect = ASPECTS.get(self.aspect)
        tiles, sizes = [], []
        for image in images:
            size = self.fit(*image.size)
            if size != image.size:
                image = image.resize(size, Image.Resampling.BICUBIC)
            tiles += aspect.tiles(self, image)
            sizes.append(size)
        return preprocess(tiles), torch.tensor(sizes, dtype=torch.long).reshape(-1, 2)

    def arrange(
        self, tokens: torch.Tensor, size: tuple[int, int], newline: torch.Tensor | None
    ) -> torch.Tensor:
        """One image's connector output over its tiles [T, K, D] → its visual tokens [num_tokens(size), D]."""
        return ASPECTS.get(self.aspect).arrange(self, tokens, *size, newline)


class Square:
    """The tower's own processor sees the whole image; one tile."""

    varies = False

    @staticmethod
    def num_tiles(layout: ImageLayout, width: int, height: int) -> int:
        return 1

    @staticmethod
    def num_tokens(layout: ImageLayout, width: int, height: int) -> int:
        return layout.tile_tokens

    @staticmethod
    def tiles(layout: ImageLayout, image: Image.Image) -> list[Image.Image]:
        return [image]

    @staticmethod
    def arrange(layout, tokens: torch.Tensor, width: int, height: int, newline) -> torch.Tensor:
        return tokens[0]


class Pad(Square):
    """LLaVA-1.5's `expand2square`: centred on a square of the tower's mean colour, then the tower's processor."""

    @staticmethod
    def tiles(layout: ImageLayout, image: Image.Image) -> list[Image.Image]:
        w, h = image.size
        if w == h:
            return [image]
        side = max(w, h)
        square = Image.new("RGB", (side, side), layout.fill)
        square.paste(image, ((side - w) // 2, (side - h) // 2))
        return [square]


class AnyRes:
    """LLaVA-NeXT: a global thumbnail + the tiles of the best-fitting grid, unpadded, a newline after each row."""

    varies = True

    @staticmethod
    def grid(layout: ImageLayout, width: int, height: int) -> tuple[int, int, int, int]:
        """(rows, cols, grid height, grid width in pixels) of the best-fitting pinpoint."""
        if not layout.grid_pinpoints or not layout.tile_size:
            raise ValueError("anyres needs grid_pinpoints and the tower's tile size")
        gh, gw = select_best_resolution((height, width), [list(p) for p in layout.grid_pinpoints])
        return gh // layout.tile_size, gw // layout.tile_size, gh, gw

    @staticmethod
    def num_tiles(layout: ImageLayout, width: int, height: int) -> int:
        rows, cols, _, _ = AnyRes.grid(layout, width, height)
        return 1 + rows * cols

    @staticmethod
    def num_tokens(layout: ImageLayout, width: int, height: int) -> int:
        rows, cols, _, _ = AnyRes.grid(layout, width, height)
        side = layout.grid_side
        r, c = unpadded_shape(width, height, rows * side, cols * side)
        return side * side + r * (c + 1)

    @staticmethod
    def tiles(layout: ImageLayout, image: Image.Image) -> list[Image.Image]:
        # transformers' LlavaNextImageProcessor: resize into the grid keeping the aspect ratio (its
        # get_patch_output_size), centre on black, cut row by row; the squashed whole image goes first.
        w, h = image.size
        rows, cols, gh, gw = AnyRes.grid(layout, w, h)
        if gw / w < gh / h:
            new_w, new_h = gw, min(math.ceil(h * gw / w), gh)
        else:
            new_w, new_h = min(math.ceil(w * gh / h), gw), gh
        canvas = Image.new("RGB", (gw, gh), (0, 0, 0))
        canvas.paste(
            image.resize((new_w, new_h), Image.Resampling.BICUBIC), ((gw - new_w) // 2, (gh - new_h) // 2)
        )
        s = layout.tile_size
        thumb = image.resize((s, s), Image.Resampling.BICUBIC)
        return [thumb] + [
            canvas.crop((c * s, r * s, (c + 1) * s, (r + 1) * s)) for r in range(rows) for c in range(cols)
        ]

    @staticmethod
    def arrange(layout, tokens: torch.Tensor, width: int, height: int, newline) -> torch.Tensor:
        rows, cols, _, _ = AnyRes.grid(layout, width, height)
        side = layout.grid_side
        base, grid = tokens[0], tokens[1:]  # [K, D], [rows*cols, K, D]
        d = tokens.shape[-1]
        grid = grid.view(rows, cols, side, side, d).permute(4, 0, 2, 1, 3)  # [D, rows, side, cols, side]
        grid = grid.flatten(1, 2).flatten(2, 3)  # [D, rows*side, cols*side]
        r, c = unpadded_shape(width, height, rows * side, cols * side)
        top, left = (rows * side - r) // 2, (cols * side - c) // 2
        grid = grid[:, top : top + r, left : left + c]  # [D, r, c]
        if newline is None:
            raise ValueError("anyres needs the connector's image_newline")
        ends = newline.to(grid)[:, None, None].expand(d, r, 1)
        grid = torch.cat([grid, ends], dim=-1).flatten(1, 2).transpose(0, 1)  # [r*(c+1), D]
        return torch.cat([base, grid], dim=0)  # [K + r*(c+1), D]


ASPECTS: Registry = Registry("image aspect")
ASPECTS.register("square")(Square)
ASPECTS.register("pad")(Pad)
ASPECTS.register("anyres")(AnyRes)


def layout_for(cfg, tile_size: int, tile_tokens: int, fill: tuple[int, int, int] = (0, 0, 0)) -> ImageLayout:
    """The `ImageLayout` of a `VisionConfig` on a tower of `tile_size` px whose tiles become `tile_tokens` tokens."""
    pinpoints = cfg.grid_pinpoints or (default_pinpoints(tile_size, cfg.max_tiles) if tile_size else [])
    if cfg.image_aspect == "anyres":
        off = [p for p in pinpoints if p[0] % tile_size or p[1] % tile_size]
        if off:
            raise ValueError(
                f"vision.grid_pinpoints {off} are not multiples of the tower's {tile_size} px input"
            )
    return ImageLayout(
        aspect=cfg.image_aspect,
        tile_tokens=tile_tokens,
        tile_size=tile_size,
        grid_pinpoints=tuple(tuple(p) for p in pinpoints),
        min_pixels=cfg.min_pixels,
        max_pixels=cfg.max_pixels,
        max_image_tokens=cfg.max_image_tokens,
        fill=fill,
    )
