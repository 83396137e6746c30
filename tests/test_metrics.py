"""Metrics against closed forms and direct computations; distributed = single; the CLI; learning lowers FID."""
import json
import sys

import numpy as np
import pytest
import torch

from bigan.metrics import metrics
from bigan.metrics.features import FeatureStats
from conftest import HELPERS, free_port, run, tiny_args, train


def test_fid_matches_the_closed_form_for_gaussians():
    rng = np.random.default_rng(0)
    mu_a, mu_b = rng.normal(size=16), rng.normal(size=16)
    s_a, s_b = rng.uniform(0.5, 2, 16), rng.uniform(0.5, 2, 16)
    closed = np.sum((mu_a - mu_b) ** 2) + np.sum(s_a + s_b - 2 * np.sqrt(s_a * s_b))
    assert metrics.fid_from_stats(mu_a, np.diag(s_a), mu_b, np.diag(s_b)) == pytest.approx(closed, rel=1e-6)
    rotation, _ = np.linalg.qr(rng.normal(size=(16, 16)))  # same spectra in a rotated basis: the same FID
    rotated = metrics.fid_from_stats(rotation @ mu_a, rotation @ np.diag(s_a) @ rotation.T,
                                     rotation @ mu_b, rotation @ np.diag(s_b) @ rotation.T)
    assert rotated == pytest.approx(closed, rel=1e-6)


def test_streamed_statistics_equal_numpy_mean_and_covariance():
    features = torch.randn(300, 8, dtype=torch.float64) * torch.arange(1, 9) + 3
    stats = FeatureStats(8, keep=50)
    for part in torch.split(torch.arange(300), 64):
        stats.update(features[part], part)
    mu, sigma = stats.mean_cov()
    assert np.allclose(mu, features.numpy().mean(0), rtol=1e-12)
    assert np.allclose(sigma, np.cov(features.numpy(), rowvar=False), rtol=1e-10)
    assert np.array_equal(stats.kept_features(), features[:50].float().numpy())


def test_kid_unbiased_estimator_matches_a_direct_computation():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(30, 4)), rng.normal(0.5, 1, size=(30, 4))

    def k(a, b):
        return (a @ b / 4 + 1) ** 3

    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    value, std = metrics.kid(x, y, subsets=1, subset_size=m)
    assert value == pytest.approx(xx + yy - 2 * xy, rel=1e-10) and std == 0


def _split_sums(probs, splits):
    chunks = np.array_split(probs, splits)
    return ([c.sum(0) for c in chunks], [np.sum(c * np.log(np.clip(c, 1e-30, None))) for c in chunks],
            [len(c) for c in chunks])


def test_inception_score_on_known_distributions():
    confident_uniform = np.tile(np.eye(10), (20, 1))  # each sample sure of its class, classes balanced: IS = 10
    assert metrics.inception_score(*_split_sums(confident_uniform, 10))[0] == pytest.approx(10, rel=1e-9)
    undecided = np.full((200, 10), 0.1)  # every sample the same distribution: IS = 1
    assert metrics.inception_score(*_split_sums(undecided, 10))[0] == pytest.approx(1, rel=1e-9)


def test_precision_recall_on_constructed_sets():
    points = torch.randn(200, 5, generator=torch.Generator().manual_seed(0))
    assert metrics.precision_recall(points, points.clone()) == (1.0, 1.0)
    assert metrics.precision_recall(points, points + 100) == (0.0, 0.0)
    half = metrics.precision_recall(points, torch.cat([points[:100], points[:100] + 100]))
    assert half[0] == pytest.approx(0.5)


def test_two_process_evaluation_equals_one_process(tiny_shards, small_extractor, tmp_path, env):
    helper = str(HELPERS / "eval_equivalence.py")
    one = {**env, "BIGAN_CACHE": str(tmp_path / "cache1")}
    two = {**env, "BIGAN_CACHE": str(tmp_path / "cache2")}  # reference statistics computed afresh, distributed
    run([sys.executable, helper, str(tmp_path / "one.json"), str(tiny_shards), str(small_extractor)], one)
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         helper, str(tmp_path / "two.json"), str(tiny_shards), str(small_extractor)], two)
    a, b = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("one", "two"))
    assert a["n_ref"] == b["n_ref"] == 96
    for key in ("fid", "kid", "kid_std", "precision", "recall", "is", "is_std", "kl_modes"):
        assert b[key] == pytest.approx(a[key], rel=1e-9, abs=1e-12), key
    assert a["modes"] == b["modes"] >= 1 and a["modes_of"] == b["modes_of"]


def test_mode_coverage_counts_modes_and_kl_to_uniform():
    assert metrics.mode_coverage(np.full(1000, 26)) == (1000, pytest.approx(0.0, abs=1e-12))
    assert metrics.mode_coverage(np.eye(1000)[3] * 26000) == (1, pytest.approx(np.log(1000)))
    assert metrics.mode_coverage(np.r_[np.full(500, 52), np.zeros(500)]) == (500, pytest.approx(np.log(2)))


class BrightnessClassifier(torch.nn.Module):
    """4 classes: the quartile of an image's mean value."""

    def forward(self, x):
        level = (x.float().mean(dim=(1, 2, 3)) / 64).long().clamp(0, 3)
        return torch.nn.functional.one_hot(level, 4).float()


def test_bigan_eval_scores_modes_of_a_samples_file(tmp_path, env):
    classifier = tmp_path / "classifier.pt"
    torch.jit.script(BrightnessClassifier()).save(str(classifier))
    levels = np.repeat(np.array([10, 80, 150, 220], np.uint8), 25)  # 100 images, 25 per class
    np.savez(tmp_path / "even.npz", images=np.broadcast_to(levels[:, None, None, None], (100, 8, 8, 3)).copy())
    np.savez(tmp_path / "one.npz", images=np.full((100, 8, 8, 3), 80, np.uint8))
    scores = {}
    for name in ("even", "one"):
        out = run([sys.executable, "-m", "bigan.metrics.evaluate", "--samples", str(tmp_path / f"{name}.npz"),
                   "--modes", str(classifier)], env).stdout
        scores[name] = json.loads(out.strip().splitlines()[-1])
    assert (scores["even"]["modes"], scores["even"]["modes_of"], scores["even"]["n"]) == (4, 4, 100)
    assert scores["even"]["kl_modes"] == pytest.approx(0, abs=1e-12)
    assert scores["one"]["modes"] == 1 and scores["one"]["kl_modes"] == pytest.approx(np.log(4))
    (tmp_path / "junk.npz").write_text("not an array")
    for argv, message in [(["--samples", str(tmp_path / "junk.npz"), "--modes", str(classifier)], "junk.npz"),
                          (["--samples", str(tmp_path / "one.npz")], "nothing to compute"),
                          (["--samples", str(tmp_path / "one.npz"), "--modes", str(tmp_path / "no.pt")], "no.pt")]:
        result = run([sys.executable, "-m", "bigan.metrics.evaluate", *argv], env, check=False)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert message in result.stderr.strip().splitlines()[-1]


def test_bigan_eval_end_to_end_and_training_lowers_fid(tiny_shards, small_extractor, tmp_path, env):
    """The untrained generator vs the same one after a short run, scored by bigan-eval and in the loop."""
    run_dir = tmp_path / "run"
    args = tiny_args(tiny_shards, run_dir, **{
        "train.kimg": 3.2, "model.g_channels": 16, "model.d_channels": 16, "train.batch_size": 16,
        "run.log_every": 10, "eval.every_kimg": 1.6, "eval.n": 96, "eval.extractor": small_extractor,
        "eval.metrics": "fid,kid,pr", "eval.modes": small_extractor})
    result = train(args, env)
    logged = [line for line in result.stdout.splitlines() if line.startswith("bigan: evaluation at ")]
    assert [line.split(" kimg:")[0] for line in logged] == ["bigan: evaluation at 1.6", "bigan: evaluation at 3.2"]
    assert all(" fid " in line and " modes " in line and " kl_modes " in line for line in logged), logged
    evaluated = []
    for checkpoint in ("untrained", "trained"):
        target = run_dir / "export" / "generator.safetensors" if checkpoint == "trained" else _untrained(tmp_path, run_dir)
        out = tmp_path / f"{checkpoint}.json"
        run([sys.executable, "-m", "bigan.metrics.evaluate", "--checkpoint", str(target), "--data", str(tiny_shards),
             "--n", "96", "--extractor", str(small_extractor), "--metrics", "fid,kid,is,pr", "--out", str(out)], env)
        evaluated.append(json.loads(out.read_text()))
    untrained, trained = evaluated
    assert set(trained) >= {"fid", "kid", "kid_std", "is", "is_std", "precision", "recall", "n", "n_ref"}
    assert trained["n_ref"] == 96  # every reference image, the last partial batch of 64 too
    assert trained["fid"] < 0.5 * untrained["fid"], (untrained["fid"], trained["fid"])

    best = json.loads((run_dir / "best" / "metrics.json").read_text())
    assert (run_dir / "best" / "model.safetensors").exists() and best["fid"] > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "logs" / "tensorboard"))
    events.Reload()
    fids = [e.value for e in events.Scalars("Metrics/fid")]
    assert len(fids) == 2 and best["fid"] == pytest.approx(min(fids), rel=1e-5)
    modes, kl = events.Scalars("Metrics/modes"), events.Scalars("Metrics/kl_modes")  # eval.modes, in the loop
    assert len(modes) == len(kl) == 2 and all(e.value >= 1 for e in modes) and all(e.value >= 0 for e in kl)


def _untrained(tmp_path, run_dir):
    """The run's initial generator (seed 0, as the trainer builds it), exported like a trained one."""
    from bigan.checkpoint import export_generator
    from bigan.config import config_from_dict
    from bigan.models import build_models, init_weights
    import yaml

    config = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    m = config.model
    torch.manual_seed(config.train.seed)
    g, d = build_models(m.arch, config.data.resolution, m.z_dim, m.g_channels, m.d_channels, m.num_classes, m.d_norm)
    g.apply(init_weights)
    export_generator(tmp_path / "untrained", g, None, config.to_dict()["model"], {"resolution": config.data.resolution})
    return tmp_path / "untrained" / "generator.safetensors"


def test_missing_inception_weights_is_a_one_line_error(tmp_path, env):
    missing = tmp_path / "nowhere" / "inception-2015-12-05.pkl"
    result = run([sys.executable, "-m", "bigan.metrics.evaluate", "--checkpoint", str(tmp_path), "--data", str(tmp_path)],
                 {**env, "BIGAN_INCEPTION": str(missing)}, check=False)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("bigan-eval: error:") and str(missing) in last and "inception-2015-12-05.pkl" in last

    # the default run (the demo set, not rendered yet in this cache): refused before rendering or writing anything
    result = train([f"--run.dir={tmp_path / 'run'}", "--eval.every_kimg=1", "--train.kimg=0.1"],
                   {**env, "BIGAN_INCEPTION": str(missing), "BIGAN_CACHE": str(tmp_path / "cache")}, check=False)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "eval.every_kimg: FID Inception weights not found" in last and str(missing) in last
    assert "rendering" not in result.stdout and not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_stacked_glyphs_and_the_mode_classifier_agree_on_mode_order():
    """bench/modes.py: mode = 100 * class(R) + 10 * class(G) + class(B), in the data and in the classifier."""
    sys.path.insert(0, str(HELPERS.parents[1] / "bench"))
    import modes
    from bigan.data import glyphs

    image, mode = glyphs.stacked(seed=0, index=5)
    again, _ = glyphs.stacked(seed=0, index=5)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8 and np.array_equal(image, again)
    rng = np.random.default_rng([0, 5])
    assert mode == int(np.dot(rng.integers(10, size=3), [100, 10, 1]))

    class Brightness(torch.nn.Module):  # class = tenths of the mean value of one glyph channel
        def forward(self, x):
            return torch.nn.functional.one_hot((x.mean(dim=(1, 2, 3)) * 10).long().clamp(0, 9), 10).float() * 50

    levels = torch.tensor([0.05, 0.35, 0.75])  # classes 0, 3, 7
    images = (levels[None, :, None, None].expand(2, 3, 32, 32) * 255).round().to(torch.uint8)
    classifier = modes.StackedClassifier(Brightness())
    assert classifier(images).argmax(1).tolist() == [37, 37]
    assert classifier(images.flip(1)).argmax(1).tolist() == [730, 730]


def test_demo_quality_sun_contrast_sees_a_disc_and_not_a_blur():
    """bench/demo_quality.py's sun score: a bright disc over a sky scores its excess over the
    surroundings; the same disc smeared into a glow, or a sky without one, scores far lower."""
    sys.path.insert(0, str(HELPERS.parents[1] / "bench"))
    import demo_quality
    from bigan.data.demo import render_landscape

    def blur(images, k):  # uint8 NHWC, a k x k box filter
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
        x = torch.nn.functional.avg_pool2d(x, k, 1, k // 2, count_include_pad=False)
        return x.permute(0, 2, 3, 1).round().byte().numpy()

    yy, xx = np.mgrid[0:32, 0:32]
    sky = np.repeat((60 + 3 * yy)[..., None], 3, axis=2).astype(np.uint8)[None]   # a smooth gradient
    disc = sky.copy()
    disc[0][(yy - 10) ** 2 + (xx - 20) ** 2 <= 4] = 250                               # radius 2 px
    assert demo_quality.sun_contrast(sky) < 5
    assert demo_quality.sun_contrasts(np.concatenate([sky, disc, sky])).argmax() == 1  # one score per image
    assert demo_quality.sun_contrast(disc) > 90  # 190 above the sky, less the disc's share of the window
    assert demo_quality.sun_contrast(blur(disc, 7)) < demo_quality.sun_contrast(disc) / 3
    real = np.stack([render_landscape(0, i, 32) for i in range(64)])
    assert demo_quality.sun_contrast(blur(real, 5)) < 0.6 * demo_quality.sun_contrast(real)


def test_the_loop_and_bigan_eval_give_the_same_fid_for_a_bf16_run(tiny_shards, small_extractor, tmp_path, env):
    """The loop evaluates in fp32 whatever train.precision is, as bigan-eval does: the same EMA generator
    scores the same FID both ways (and both share one cache of reference statistics)."""
    run_dir = tmp_path / "run"
    train(tiny_args(tiny_shards, run_dir, **{"train.kimg": 0.064, "train.precision": "bf16", "eval.every_kimg": 0.064,
                                             "eval.n": 64, "eval.extractor": small_extractor, "eval.metrics": "fid"}),
          env)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "logs" / "tensorboard"))
    events.Reload()
    (in_loop,) = [e.value for e in events.Scalars("Metrics/fid")]
    out = tmp_path / "eval.json"
    run([sys.executable, "-m", "bigan.metrics.evaluate", "--checkpoint", str(run_dir), "--data", str(tiny_shards),
         "--n", "64", "--extractor", str(small_extractor), "--metrics", "fid", "--out", str(out)], env)
    assert json.loads(out.read_text())["fid"] == pytest.approx(in_loop, rel=1e-5)


class FakeInception(torch.nn.Module):
    """The calling convention of StyleGAN3's Inception pickle, with an output bias that IS must leave out."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                        torch.nn.Flatten())
        self.head = torch.nn.Linear(8, 5, bias=False)
        self.register_buffer("output_bias", torch.tensor([6.0, 0.0, 0.0, 0.0, 0.0]))

    def forward(self, images, return_features: bool = False, use_fp16: bool = False, no_output_bias: bool = False):
        features = self.body(images.float() / 127.5 - 1)
        if return_features:
            return features
        logits = self.head(features) * 20
        return torch.softmax(logits if no_output_bias else logits + self.output_bias, dim=1)


def test_inception_score_leaves_out_the_output_bias_as_published(tiny_shards, tmp_path, env):
    """IS as StyleGAN3's metrics compute it: the softmax of Inception's logits without the output bias."""
    fake = tmp_path / "inception-2015-12-05.pkl"
    torch.jit.script(FakeInception()).save(str(fake))
    images = np.random.default_rng(0).integers(0, 256, (100, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", images=images)
    out = tmp_path / "is.json"
    run([sys.executable, "-m", "bigan.metrics.evaluate", "--samples", str(tmp_path / "samples.npz"), "--data",
         str(tiny_shards), "--metrics", "is", "--inception", str(fake), "--out", str(out)], env)
    with torch.no_grad():
        probs = FakeInception()(torch.from_numpy(images).permute(0, 3, 1, 2), no_output_bias=True).double().numpy()
    splits = np.array_split(probs, 10)
    expected, _ = metrics.inception_score([p.sum(0) for p in splits], [(p * np.log(p)).sum() for p in splits],
                                          [len(p) for p in splits])
    assert json.loads(out.read_text())["is"] == pytest.approx(expected, rel=1e-6)
