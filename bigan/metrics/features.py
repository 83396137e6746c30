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


PROBE = 2  # images in the blank batch every network is tried on when it is loaded


def load_network(path: Path):
    """A TorchScript file, a pickled TorchScript module (StyleGAN's Inception) or a pickled nn.Module."""
    try:
        net = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError):
        with open(path, "rb") as f:
            try:
                net = pickle.load(f)  # StyleGAN's inception-2015-12-05.pkl: a pickled TorchScript module
            except Exception:
                net = None
        if net is None:
            try:
                net = torch.load(path, map_location="cpu", weights_only=False)
            except Exception as exc:
                raise ExtractorError(f"{path} is neither TorchScript nor a pickled module ({type(exc).__name__}: "
                                     f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if isinstance(net, dict):
        raise ExtractorError(f"{path} holds a state_dict (weights only), not a network: save the module itself, "
                             f"with torch.jit.script(net).save(path) or torch.save(net, path)")
    if not isinstance(net, torch.nn.Module) and not isinstance(net, torch.jit.ScriptModule):
        raise ExtractorError(f"{path} holds a {type(net).__name__}, not a network (torch.nn.Module or TorchScript)")
    return net


def _probe_failed(path: Path, exc: Exception) -> ExtractorError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ExtractorError(f"{path} fails on a batch of uint8 NCHW images ({reason}); bigan passes pixels as uint8 "
                          f"0-255: wrap the network so that it converts them (e.g. x.float() / 127.5 - 1)")


def check_output(name: str, what: str, out: torch.Tensor, n: int, at_least: int = 1, finite: bool = False):
    """Refuse a network output that is not (n, k >= at_least) (and, with `finite`, all finite numbers), in
    one line naming it. Shapes are checked on every call (they are the same on every rank); finiteness
    on the blank probe only: during an evaluation non-finite rows are counted and refused after the
    ranks' counts are summed, so that every rank stops alike (bigan.metrics.evaluate)."""
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != n or out.shape[1] < at_least:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ExtractorError(f"{name} gives {what} of shape {shape} for {n} images, not ({n}, {what})"
                             + (f" with at least {at_least}" if at_least > 1 else ""))
    if finite and not torch.isfinite(out).all():
        raise ExtractorError(f"{name} gives non-finite {what} (NaN or inf) for a blank batch of {n} images")
    return out


class Extractor:
    """Calls a feature network on uint8 NCHW images; returns (features, class probabilities or None).

    'inception' is the TF-ported Inception-v3 that published FIDs use, as the TorchScript
    pickle StyleGAN2-ADA/StyleGAN3 load (2048-d pool features; softmax outputs for IS).
    Any other spec is a path to a TorchScript file or a pickled nn.Module taking uint8 NCHW
    images and returning features, or (features, logits). It is tried once, when it is loaded,
    on a blank batch at `resolution`: a network that fails on uint8 input, or gives anything but
    finite (N, features) rows, is refused there in one line, not at the first evaluation.
    """

    def __init__(self, spec: str, device="cpu", inception_file: str | None = None, resolution: int | None = None):
        self.device = torch.device(device)
        self.is_inception = spec == "inception"
        path = inception_path(inception_file) if self.is_inception else Path(spec)
        if not path.exists():
            if self.is_inception:
                raise ExtractorError(missing_inception(path))
            raise ExtractorError(f"feature extractor not found: {path}")
        self.net = load_network(path).to(self.device).eval()
        self.name = f"{'inception' if self.is_inception else path.stem}-{_digest(path)}"
        self.path = path
        if resolution is not None:
            self.probe(resolution)

    def probe(self, resolution: int):
        """Try the network on a blank batch at this resolution (its feature and class counts come from it)."""
        try:
            features, probs = self(torch.zeros(PROBE, 3, resolution, resolution, dtype=torch.uint8), want_probs=True)
        except ExtractorError:
            raise
        except Exception as exc:
            raise _probe_failed(self.path, exc) from None
        for what, out in (("features", features), ("probabilities", probs)):
            if out is not None:
                check_output(str(self.path), what, out, PROBE, finite=True)
        self.dim, self.classes = features.shape[1], probs.shape[1] if probs is not None else 0

    @torch.no_grad()
    def __call__(self, images_uint8: torch.Tensor, want_probs: bool = False):
        images = images_uint8.to(self.device)
        if self.is_inception:
            features = self.net(images, return_features=True)
            # IS as published (StyleGAN3's metrics): the softmax of the logits without the output bias
            probs = self.net(images, no_output_bias=True) if want_probs else None
        else:
            out = self.net(images)
            features, logits = out if isinstance(out, (tuple, list)) else (out, None)
            if logits is not None:
                check_output(str(self.path), "logits", logits, len(images))
            probs = torch.softmax(logits.double(), dim=1) if (want_probs and logits is not None) else None
        check_output(str(self.path), "features", features, len(images))
        return features.double(), (probs.double() if probs is not None else None)


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
        self.n, self.sum, self.outer, self.nonfinite = 0, np.zeros(dim), np.zeros((dim, dim)), 0
        self.keep, self.kept = keep, {}
        self.total, self.splits = total, splits
        self.p_sums = np.zeros((splits, classes)) if classes else None
        self.plogp, self.counts = np.zeros(splits), np.zeros(splits)

    def update(self, features: torch.Tensor, indices: torch.Tensor, probs: torch.Tensor | None = None):
        f = features.cpu().double().numpy()
        self.nonfinite += int((~np.isfinite(f).all(1)).sum())
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
        self.n, self.nonfinite = (int(x) for x in accelerator.reduce(torch.tensor([self.n, self.nonfinite],
                                                                              device=device), "sum").tolist())
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
    images to K class logits (or to (features, logits)); calling it gives each image's class.
    Tried once when loaded, on a blank batch at `resolution` (K >= 2 finite logits per image)."""

    def __init__(self, path: str, device="cpu", resolution: int | None = None):
        path = Path(path)
        if not path.exists():
            raise ExtractorError(f"mode classifier not found: {path}")
        self.device, self.path = torch.device(device), path
        self.net = load_network(path).to(self.device).eval()
        self.name = f"{path.stem}-{_digest(path)}"
        if resolution is not None:
            self.probe(resolution)

    def probe(self, resolution: int):
        """Try the classifier on a blank batch at this resolution (its class count comes from it)."""
        try:
            logits = self._logits(torch.zeros(PROBE, 3, resolution, resolution, dtype=torch.uint8))
        except ExtractorError:
            raise
        except Exception as exc:
            raise _probe_failed(self.path, exc) from None
        self.classes = check_output(f"mode classifier {self.path}", "classes", logits, PROBE, finite=True).shape[1]

    @torch.no_grad()
    def _logits(self, images_uint8: torch.Tensor) -> torch.Tensor:
        out = self.net(images_uint8.to(self.device))
        logits = out[1] if isinstance(out, (tuple, list)) else out
        return check_output(f"mode classifier {self.path}", "classes", logits, len(images_uint8), at_least=2)

    def __call__(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """Each image's class, or -1 where the logits are not finite (counted, see ModeCounts)."""
        logits = self._logits(images_uint8)
        return torch.where(torch.isfinite(logits).all(1), logits.argmax(1), -1).cpu()


class ModeCounts:
    """How many images fell in each of K classes, and in none (non-finite logits: the last entry);
    additive across ranks."""

    def __init__(self, classes: int):
        self.counts = np.zeros(classes + 1, np.int64)

    def update(self, classes: torch.Tensor):
        np.add.at(self.counts, classes.numpy(), 1)  # -1 (non-finite) lands in the last entry

    def reduce(self, accelerator):
        if accelerator.num_processes > 1:
            self.counts = accelerator.reduce(torch.from_numpy(self.counts).to(accelerator.device), "sum").cpu().numpy()
        return self

    @property
    def unscored(self) -> int:
        return int(self.counts[-1])

    @property
    def classes(self) -> np.ndarray:
        return self.counts[:-1]
