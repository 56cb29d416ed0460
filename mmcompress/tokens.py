"""The two data types where methods and adapters meet (DESIGN §1).

* :class:`VisualTokens` — one image's visual tokens as the model packs them for the LLM, with their
  layout (which view and grid cell every index is) and the signals a method asked for.
* :class:`Selection` — what a method returns for one image: the kept indices (in that packing) and,
  for merging methods, the merged features.

Index ``i`` always means "the i-th visual token of this image as the model packs it", so a selection can
be mapped back onto the picture.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["GridView", "Layout", "VisualTokens", "Selection"]


@dataclass(frozen=True)
class GridView:
    """One view of an image as packed into the visual-token sequence.

    The view's tokens occupy packed indices ``[start, start + num_tokens)`` in row-major order. When
    ``newline`` is true every row ends with one extra token (LLaVA-NeXT's ``image_newline``), so a row has
    ``cols + 1`` tokens and the newline of row ``r`` sits at ``start + r * (cols + 1) + cols``.

    Attributes:
        name: ``"base"`` (single view / AnyRes thumbnail), ``"crops"`` (AnyRes high-res grid) or
            ``"frame<i>"`` for video.
        start: first packed index of the view.
        rows, cols: the token grid as packed (for AnyRes crops: after unpadding).
        newline: whether each row ends with a newline token.
        tiles: the crop grid ``(tile_rows, tile_cols)`` the view was assembled from (``(1, 1)`` for a
            single view).
        tile_shape: tokens per crop ``(h, w)`` before unpadding; ``(rows, cols)`` for a single view.
        offset: ``(top, left)`` tokens removed by unpadding, in the coordinates of the full padded
            ``tiles * tile_shape`` canvas; lets a method find which crop a token came from.
    """

    name: str
    start: int
    rows: int
    cols: int
    newline: bool = False
    tiles: tuple[int, int] = (1, 1)
    tile_shape: tuple[int, int] | None = None
    offset: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        if self.rows < 1 or self.cols < 1:
            raise ValueError(f"GridView {self.name!r}: rows/cols must be >= 1, got {self.rows}x{self.cols}")
        if self.tile_shape is None:
            object.__setattr__(self, "tile_shape", (self.rows, self.cols))

    @property
    def num_tokens(self) -> int:
        return self.rows * (self.cols + int(self.newline))

    @property
    def stop(self) -> int:
        return self.start + self.num_tokens

    def grid_indices(self) -> torch.Tensor:
        """Packed indices of the grid cells (newlines excluded) as a ``[rows, cols]`` LongTensor."""
        width = self.cols + int(self.newline)
        r = torch.arange(self.rows)[:, None] * width
        c = torch.arange(self.cols)[None, :]
        return self.start + r + c

    def newline_indices(self) -> torch.Tensor:
        """Packed indices of this view's newline tokens, ``[rows]`` (empty without newlines)."""
        if not self.newline:
            return torch.empty(0, dtype=torch.long)
        return self.start + torch.arange(self.rows) * (self.cols + 1) + self.cols

    def tile_of(self) -> torch.Tensor:
        """For each grid cell, the crop (tile) it came from, row-major over ``tiles``: ``[rows, cols]``."""
        th, tw = self.tile_shape
        top, left = self.offset
        r = (torch.arange(self.rows) + top) // th
        c = (torch.arange(self.cols) + left) // tw
        return r[:, None] * self.tiles[1] + c[None, :]


@dataclass(frozen=True)
class Layout:
    """How one image's visual tokens are packed: a tuple of consecutive :class:`GridView` s."""

    views: tuple[GridView, ...]

    def __post_init__(self) -> None:
        pos = 0
        for v in self.views:
            if v.start != pos:
                raise ValueError(
                    f"Layout views must be contiguous: view {v.name!r} starts at {v.start}, expected {pos}"
                )
            pos = v.stop

    @classmethod
    def single(cls, rows: int, cols: int) -> Layout:
        """A single-view grid (LLaVA-1.5 style)."""
        return cls((GridView("base", 0, rows, cols),))

    @property
    def num_tokens(self) -> int:
        return self.views[-1].stop if self.views else 0

    def view(self, name: str) -> GridView:
        for v in self.views:
            if v.name == name:
                return v
        raise KeyError(f"no view named {name!r}; views are {[v.name for v in self.views]}")

    def newline_mask(self) -> torch.Tensor:
        """``[N]`` bool, true at newline tokens."""
        mask = torch.zeros(self.num_tokens, dtype=torch.bool)
        for v in self.views:
            mask[v.newline_indices()] = True
        return mask

    def to_dict(self) -> dict:
        return {"views": [v.__dict__ | {"num_tokens": v.num_tokens} for v in self.views]}


@dataclass
class VisualTokens:
    """One image's visual tokens.

    Attributes:
        features: ``[N, D]`` projected features, in the LLM's embedding space and dtype.
        layout: where each of the N tokens sits.
        signals: what the method declared in ``needs``, keyed by the signal object (e.g.
            ``VitAttention(layer=-1, kind="cls")`` → ``[views, heads, T]``).
        image_index: the image's position in the batch's flattened image list.
    """

    features: torch.Tensor
    layout: Layout
    signals: dict = field(default_factory=dict)
    image_index: int = 0

    def __post_init__(self) -> None:
        if self.features.dim() != 2:
            raise ValueError(f"VisualTokens.features must be [N, D], got shape {tuple(self.features.shape)}")
        if self.features.shape[0] != self.layout.num_tokens:
            raise ValueError(
                f"VisualTokens: features have {self.features.shape[0]} rows but the layout packs "
                f"{self.layout.num_tokens} tokens"
            )

    @property
    def num_tokens(self) -> int:
        return self.features.shape[0]


@dataclass
class Selection:
    """A method's decision for one image.

    Attributes:
        indices: ``[K]`` LongTensor of kept packed indices, ascending. Merging methods give the index
            whose position (RoPE slot) each merged token takes.
        features: ``[K, D]`` replacement features (merging methods), or ``None`` to keep
            ``tokens.features[indices]`` unchanged (pruning methods).
        weights: ``[K]`` how many original tokens each output token stands for (merging), or ``None``.
        groups: ``[N]`` LongTensor mapping every input token to the output slot it went to (``-1`` =
            dropped), for pictures of merged groups; ``None`` for pure pruning.
    """

    indices: torch.Tensor
    features: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    groups: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.indices.dim() != 1 or self.indices.dtype != torch.long:
            raise ValueError(
                f"Selection.indices must be a 1-D int64 tensor, got shape "
                f"{tuple(self.indices.shape)} dtype {self.indices.dtype}"
            )
        if self.features is not None and self.features.shape[0] != self.indices.shape[0]:
            raise ValueError(
                f"Selection.features has {self.features.shape[0]} rows for {self.indices.shape[0]} indices"
            )

    @property
    def num_kept(self) -> int:
        return int(self.indices.shape[0])

    def kept_features(self, features: torch.Tensor) -> torch.Tensor:
        """``[K, D]``: the features the LLM will see, given the image's original ``[N, D]`` features."""
        if self.features is not None:
            return self.features.to(device=features.device, dtype=features.dtype)
        return features.index_select(0, self.indices.to(features.device))
