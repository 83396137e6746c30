"""TensorBoard through Accelerate's trackers, image grids, and a progress bar."""
from __future__ import annotations

import resource
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Generator output in [-1, 1] as uint8 pixels (the inverse of the stream's x / 127.5 - 1)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def image_grid(images: torch.Tensor, columns: int | None = None) -> np.ndarray:
    """uint8 HxWx3 grid of images in [-1, 1] (NCHW)."""
    images = to_uint8(images).cpu()
    n, c, h, w = images.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    grid = torch.zeros(c, rows * h, columns * w, dtype=torch.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[:, r * h:(r + 1) * h, col * w:(col + 1) * w] = image
    return grid.permute(1, 2, 0).numpy()


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Tracker:
    """Scalars and images to TensorBoard (main process only; other ranks call it as a no-op)."""

    def __init__(self, accelerator, run_dir: Path, config_yaml: str):
        self.accelerator, self.run_dir = accelerator, Path(run_dir)
        accelerator.init_trackers("tensorboard")
        self.accelerator.log({"config": f"```yaml\n{config_yaml}```"}, step=0)

    def scalars(self, values: dict, images_seen: int):
        self.accelerator.log(values, step=images_seen)

    def images(self, name: str, images: torch.Tensor, images_seen: int, columns: int | None = None):
        """A grid of images; what its rows show (a text-to-image family's prompts), if the family's grid names
        it as images.texts, goes beside it: TensorBoard text NAME/prompts and a .txt by the PNG."""
        if not self.accelerator.is_main_process:
            return
        grid = image_grid(images, columns)
        writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
        writer.add_image(name, grid, global_step=images_seen, dataformats="HWC")
        out = self.run_dir / "samples" / f"{name.replace('/', '_')}_{images_seen / 1000:08.1f}kimg.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(out)
        texts = getattr(images, "texts", None)
        if texts:
            writer.add_text(f"{name}/prompts", "  \n".join(texts), global_step=images_seen)  # (markdown line breaks)
            out.with_suffix(".txt").write_text("\n".join(texts) + "\n")

    def close(self):
        self.accelerator.end_training()
