"""Feature extractors (local files only; bigan never downloads) and streamed feature statistics."""
from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import torch

INCEPTION_FILE = "inception-2015-12-05.pkl"
INCEPTION_URL = ("https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/"
                 "metrics/inception-2015-12-05.pkl")


class ExtractorError(Exception):
    pass


def inception_path(explicit: str | None = None) -> Path:
    """Where the FID Inception weights are looked for: the given path, $BIGAN_INCEPTION, or the cache dir."""
    from bigan.data.demo import cache_dir

    return Path(explicit or os.environ.get("BIGAN_INCEPTION") or cache_dir() / INCEPTION_FILE)


def missing_inception(path: Path, flag: str = "--inception") -> str:
    return (f"FID Inception weights not found at {path}: download {INCEPTION_URL} on a machine with internet "
            f"and put it there (or set BIGAN_INCEPTION / {flag})")


class Extractor:
    """Calls a feature network on uint8 NCHW images; returns (features, class probabilities or None).

    'inception' is the TF-ported Inception-v3 that published FIDs use, as the TorchScript
    pickle StyleGAN2-ADA/StyleGAN3 load (2048-d pool features; softmax outputs for IS).
    Any other spec is a path to a TorchScript file or a pickled nn.Module taking uint8 NCHW
    images and returning features, or (features, logits).
    """

    def __init__(self, spec: str, device="cpu", inception_file: str | None = None):
        self.device = torch.device(device)
        self.is_inception = spec == "inception"
        path = inception_path(inception_file) if self.is_inception else Path(spec)
        if not path.exists():
            if self.is_inception:
                raise ExtractorError(missing_inception(path))
            raise ExtractorError(f"feature extractor not found: {path}")
        self.net = self._load(path).to(self.device).eval()
        self.name = f"{'inception' if self.is_inception else path.stem}-{_digest(path)}"

    @staticmethod
    def _load(path: Path):
        try:
            return torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, ValueError):
            pass
        with open(path, "rb") as f:
            try:
                return pickle.load(f)  # StyleGAN's inception-2015-12-05.pkl: a pickled TorchScript module
            except Exception:
                pass
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise ExtractorError(f"{path} is neither TorchScript nor a pickled module "
                                 f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None

    @torch.no_grad()
    def __call__(self, images_uint8: torch.Tensor, want_probs: bool = False):
        images = images_uint8.to(self.device)
        if self.is_inception:
            features = self.net(images, return_features=True)
            # IS as published (StyleGAN3's metrics): the softmax of the logits without the output bias
            probs = self.net(images, no_output_bias=True) if want_probs else None
            return features.double(), (probs.double() if probs is not None else None)
        out = self.net(images)
        features, logits = out if isinstance(out, (tuple, list)) else (out, None)
        probs = torch.softmax(logits.double(), dim=1) if (want_probs and logits is not None) else None
        return features.double(), probs


def _digest(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:10]


class FeatureStats:
    """Streamed statistics of a feature set: n, sum and outer-product sum (float64) for FID; the
    features of the first `keep` samples by global index for KID and precision/recall; per-split
    probability sums for IS. Additive across ranks, so an all-reduce gives the exact totals."""

    def __init__(self, dim: int, keep: int, splits: int = 10, classes: int = 0, total: int = 0):
        self.n, self.sum, self.outer = 0, np.zeros(dim), np.zeros((dim, dim))
        self.keep, self.kept = keep, {}
        self.total, self.splits = total, splits
        self.p_sums = np.zeros((splits, classes)) if classes else None
        self.plogp, self.counts = np.zeros(splits), np.zeros(splits)

    def update(self, features: torch.Tensor, indices: torch.Tensor, probs: torch.Tensor | None = None):
        f = features.cpu().double().numpy()
        self.n += len(f)
        self.sum += f.sum(0)
        self.outer += f.T @ f
        for i, row in zip(indices.tolist(), f):
            if i < self.keep:
                self.kept[i] = row.astype(np.float32)
        if probs is not None and self.p_sums is not None:
            p = probs.cpu().double().numpy()
            split = (indices.numpy() * self.splits) // max(self.total, 1)
            np.add.at(self.p_sums, split, p)
            np.add.at(self.plogp, split, (p * np.log(np.clip(p, 1e-30, None))).sum(1))
            np.add.at(self.counts, split, 1)

    def reduce(self, accelerator):
        """Sum the statistics over ranks and gather the kept features (every rank calls this)."""
        if accelerator.num_processes == 1:
            return self
        device = accelerator.device
        for name in ("sum", "outer", "plogp", "counts") + (("p_sums",) if self.p_sums is not None else ()):
            setattr(self, name, accelerator.reduce(torch.from_numpy(getattr(self, name)).to(device), "sum").cpu().numpy())
        self.n = int(accelerator.reduce(torch.tensor([self.n], device=device), "sum").item())
        from accelerate.utils import gather_object

        merged = {}
        for part in gather_object([self.kept]):
            merged.update(part)
        self.kept = merged
        return self

    def mean_cov(self):
        mu = self.sum / self.n
        return mu, (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)

    def kept_features(self) -> np.ndarray:
        return np.stack([self.kept[i] for i in sorted(self.kept)])

    def save(self, path: Path):
        mu, sigma = self.mean_cov()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, mu=mu, sigma=sigma, n=self.n, kept=self.kept_features())
        tmp.rename(path)


class ModeClassifier:
    """A classifier file for mode coverage: TorchScript or a pickled module mapping uint8 NCHW
    images to K class logits (or to (features, logits)); calling it gives each image's class."""

    def __init__(self, path: str, device="cpu"):
        path = Path(path)
        if not path.exists():
            raise ExtractorError(f"mode classifier not found: {path}")
        self.device = torch.device(device)
        self.net = Extractor._load(path).to(self.device).eval()
        self.name = f"{path.stem}-{_digest(path)}"

    def classes(self, resolution: int) -> int:
        """K, asked of the network itself on a blank image of this size."""
        return self._logits(torch.zeros(1, 3, resolution, resolution, dtype=torch.uint8)).shape[1]

    @torch.no_grad()
    def _logits(self, images_uint8: torch.Tensor) -> torch.Tensor:
        out = self.net(images_uint8.to(self.device))
        logits = out[1] if isinstance(out, (tuple, list)) else out
        if logits.ndim != 2:
            raise ExtractorError(f"mode classifier {self.name} gives shape {tuple(logits.shape)}, not (N, classes)")
        return logits

    def __call__(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return self._logits(images_uint8).argmax(1).cpu()


class ModeCounts:
    """How many images fell in each of K classes; additive across ranks."""

    def __init__(self, classes: int):
        self.counts = np.zeros(classes, np.int64)

    def update(self, classes: torch.Tensor):
        np.add.at(self.counts, classes.numpy(), 1)

    def reduce(self, accelerator):
        if accelerator.num_processes > 1:
            self.counts = accelerator.reduce(torch.from_numpy(self.counts).to(accelerator.device), "sum").cpu().numpy()
        return self
