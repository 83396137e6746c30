"""FID, KID, Inception Score and k-NN precision/recall from feature statistics (pure functions).

    FID = |mu_r - mu_g|^2 + tr(S_r + S_g - 2 (S_r S_g)^(1/2))           Heusel et al. 2017
    KID = unbiased MMD^2, kernel k(x, y) = (x.y / d + 1)^3, over subsets   Binkowski et al. 2018
    IS  = exp E_x KL(p(y|x) || p(y)), per split, mean and std             Salimans et al. 2016
    precision / recall: share of fakes inside the reals' k-NN balls, and the reverse
                                                                          Kynkaanniemi et al. 2019
    modes: classes a classifier finds among the samples; KL(p_samples || uniform over K)
                                                                          VEEGAN, PacGAN (Stacked MNIST)
"""
import numpy as np
import scipy.linalg
import torch


def fid_from_stats(mu_a, sigma_a, mu_b, sigma_b) -> float:
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    sigma_a, sigma_b = np.asarray(sigma_a, np.float64), np.asarray(sigma_b, np.float64)
    covmean = scipy.linalg.sqrtm(sigma_a @ sigma_b)
    if not np.isfinite(covmean).all():  # singular product: nudge the diagonals, as pytorch-fid does
        offset = np.eye(len(mu_a)) * 1e-6
        covmean = scipy.linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
    covmean = covmean.real
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2 * np.trace(covmean))


def kid(features_a, features_b, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Mean and std of the unbiased MMD^2 estimate over random subsets (float64)."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    m = min(len(a), len(b), subset_size)
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    estimates = []
    for _ in range(subsets):
        x, y = a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        estimates.append(within - 2 * kxy.sum() / (m * m))
    return float(np.mean(estimates)), float(np.std(estimates))


def inception_score(split_prob_sums, split_plogp_sums, split_counts) -> tuple[float, float]:
    """IS from streamed per-split sums: sum_x p(y|x), sum_x sum_y p log p, and counts."""
    scores = []
    for p_sum, plogp_sum, n in zip(split_prob_sums, split_plogp_sums, split_counts):
        if n == 0:
            continue
        marginal = np.asarray(p_sum, np.float64) / n
        kl = plogp_sum / n - np.sum(marginal * np.log(np.clip(marginal, 1e-30, None)))  # E KL = E[sum p log p] - sum p̄ log p̄
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def _kth_neighbour_radius(features: torch.Tensor, k: int, block: int) -> torch.Tensor:
    radii = []
    for start in range(0, len(features), block):
        distances = torch.cdist(features[start:start + block], features)
        radii.append(distances.kthvalue(k + 1, dim=1).values)  # +1: a point is its own nearest neighbour
    return torch.cat(radii)


def _coverage(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, block: int) -> float:
    inside = 0
    for start in range(0, len(queries), block):
        distances = torch.cdist(queries[start:start + block], support)
        inside += (distances <= radii[None, :]).any(dim=1).sum().item()
    return inside / len(queries)


def precision_recall(real, fake, k: int = 3, block: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (k-NN manifolds), in blocks so memory stays O(block x N)."""
    real, fake = torch.as_tensor(real, dtype=torch.float64), torch.as_tensor(fake, dtype=torch.float64)
    precision = _coverage(fake, real, _kth_neighbour_radius(real, k, block), block)
    recall = _coverage(real, fake, _kth_neighbour_radius(fake, k, block), block)
    return precision, recall


def mode_coverage(counts) -> tuple[int, float]:
    """(modes reached, KL(sample class histogram || uniform)) from per-class counts over all K classes."""
    counts = np.asarray(counts, np.float64)
    p = counts[counts > 0] / counts.sum()
    return int((counts > 0).sum()), float((p * np.log(p * len(counts))).sum())
