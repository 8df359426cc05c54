"""labeled_grid: layout size, exact nearest upscaling, labels drawn beside their rows, clear errors."""

import pytest
import torch

from lit_transfusion.grid import labeled_grid, save_labeled_grid


def _images(n: int, side: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def _tile(grid: torch.Tensor, r: int, c: int, side: int, padding: int, label_width: int) -> torch.Tensor:
    y, x = padding + r * (side + padding), label_width + padding + c * (side + padding)
    return grid[:, y : y + side, x : x + side]


def test_size_is_rows_times_upscaled_side_plus_label_column():
    grid = labeled_grid(_images(12, 32), ["a", "b", "c"], ncol=4, padding=2, label_width=200)
    assert grid.shape == (3, 3 * (128 + 2) + 2, 200 + 4 * (128 + 2) + 2)
    assert grid.dtype == torch.float32 and 0 <= grid.min() and grid.max() <= 1
    # default label column: twice the upscaled side
    assert labeled_grid(_images(2, 32), ["a"], ncol=2, padding=1).shape == (3, 130, 256 + 2 * 129 + 1)


@pytest.mark.parametrize("side, k", [(32, 4), (30, 5), (64, 2)])
def test_small_images_are_nearest_upscaled_by_an_integer_factor(side, k):
    images = _images(6, side, seed=side)
    grid = labeled_grid(images, ["x", "y"], ncol=3, padding=2, label_width=100)
    assert k * side >= 128 and (k - 1) * side < 128
    for i in range(6):
        tile = _tile(grid, i // 3, i % 3, k * side, 2, 100)
        # each source pixel is an exact k x k block
        blocks = tile.reshape(3, side, k, side, k)
        assert torch.equal(blocks, images[i].reshape(3, side, 1, side, 1).expand(3, side, k, side, k))


def test_large_images_are_not_upscaled():
    images = _images(2, 200)
    grid = labeled_grid(images, ["big"], ncol=2, padding=2, label_width=150)
    assert grid.shape == (3, 200 + 4, 150 + 2 * 202 + 2)
    assert torch.equal(_tile(grid, 0, 1, 200, 2, 150), images[1])


def test_labels_are_drawn_beside_their_rows():
    long = "a photo of a red circle left of a blue square and a green triangle above a yellow circle"
    grid = labeled_grid(_images(6, 32), ["a photo of a red circle", "", long], ncol=2, padding=2, label_width=200)
    column = grid[:, :, :200]
    rows = [column[:, 2 + r * 130 : 2 + r * 130 + 128] for r in range(3)]
    assert (rows[0] < 0.5).sum() > 50  # text is there (dark on the white background)
    assert torch.all(rows[1] == 1.0)  # an empty label leaves its row's column blank
    assert torch.all(column[:, :2] == 1.0) and torch.all(column[:, -2:] == 1.0)  # nothing bleeds across rows

    def text_height(row):
        ys = (row < 0.5).any(0).any(1).nonzero()
        return int(ys.max() - ys.min())

    assert text_height(rows[2]) > 2 * text_height(rows[0])  # the long label wraps over several lines
    assert torch.all(grid[:, :, 200:202] == 1.0)  # the text stays in its column
    assert torch.all(labeled_grid(_images(4, 32), ["", ""], ncol=2, label_width=200)[:, :, :200] == 1.0)


def test_wrong_number_of_images_raises():
    with pytest.raises(ValueError, match=r"5 images but 2 labels x ncol=2 = 4"):
        labeled_grid(_images(5, 32), ["a", "b"], ncol=2)
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        labeled_grid(torch.rand(4, 32, 32), ["a", "b"], ncol=2)


def test_save_labeled_grid_writes_the_png(tmp_path):
    from PIL import Image

    grid = save_labeled_grid(tmp_path / "grid.png", _images(4, 32), ["a", "b"], ncol=2)
    with Image.open(tmp_path / "grid.png") as png:
        assert png.size == (grid.shape[2], grid.shape[1])
