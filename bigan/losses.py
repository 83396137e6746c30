"""GAN losses and penalties: pure functions of logits (and, for penalties, inputs).

Each returns ``(loss, stats)``; stats are detached tensors, read on the host only when logged.
The discriminator loss weighs its real and fake terms by the balance coefficient ``r``:

    loss_D = 2 * (r * real_term + (1 - r) * fake_term)      # r = 0.5: the usual real + fake
"""
import torch
from torch.nn import functional as F

LOSSES = ("bce", "lsgan", "hinge", "wgan")


def _terms(name, real_logits, fake_logits):
    if name == "bce":
        return F.softplus(-real_logits).mean(), F.softplus(fake_logits).mean()  # -log σ(x), -log(1 - σ(x))
    if name == "lsgan":
        return (real_logits - 1).square().mean(), fake_logits.square().mean()
    if name == "hinge":
        return F.relu(1 - real_logits).mean(), F.relu(1 + fake_logits).mean()
    if name == "wgan":
        return -real_logits.mean(), fake_logits.mean()
    raise ValueError(f"loss.name must be one of {', '.join(LOSSES)}, got {name!r}")


def d_loss(name: str, real_logits, fake_logits, r: float = 0.5):
    """Discriminator loss on real and fake logits."""
    real_term, fake_term = _terms(name, real_logits.float(), fake_logits.float())
    loss = 2 * (r * real_term + (1 - r) * fake_term)
    return loss, {"Loss/D": loss.detach(), "Loss/D_real": real_term.detach(), "Loss/D_fake": fake_term.detach(),
                  "D/real": real_logits.detach().float().mean(), "D/fake": fake_logits.detach().float().mean()}


def g_loss(name: str, fake_logits):
    """Generator loss on the discriminator's logits for generated images."""
    fake_logits = fake_logits.float()
    if name == "bce":
        loss = F.softplus(-fake_logits).mean()  # non-saturating: -log σ(D(G(z)))
    elif name == "lsgan":
        loss = (fake_logits - 1).square().mean()
    elif name in ("hinge", "wgan"):
        loss = -fake_logits.mean()
    else:
        raise ValueError(f"loss.name must be one of {', '.join(LOSSES)}, got {name!r}")
    return loss, {"Loss/G": loss.detach(), "D/fake_for_G": fake_logits.detach().mean()}


def l1_term(fake_images, targets):
    """pix2pix's reconstruction term: mean |G(x) - y| over pixels (the trainer weighs it by loss.l1)."""
    l1 = (fake_images.float() - targets.float()).abs().mean()
    return l1, {"Loss/L1": l1.detach()}


def r1_penalty(real_images, real_logits, pack: int = 1):
    """R1 (Mescheder et al. 2018): E ||∇_x D(x)||² on reals; real_images must require grad.

    With packing (loss.pack=m) D's input is a pack of m images, so the norm is over the pack."""
    (grad,) = torch.autograd.grad(real_logits.float().sum(), real_images, create_graph=True)
    penalty = grad.float().square().sum(dim=(1, 2, 3)).reshape(-1, pack).sum(1).mean()
    return penalty, {"Penalty/R1": penalty.detach()}


def gradient_penalty(discriminator, real_images, fake_images, labels=None, generator=None, pack: int = 1,
                     alpha=None):
    """WGAN-GP (Gulrajani et al. 2017): E (||∇_x D(x̂)||₂ - 1)² at random interpolates x̂.

    Each sample has its own mixing weight (`alpha`, shape (N, 1, 1, 1), drawn when not given);
    with packing the norm is over each pack of `pack` samples, D's input."""
    if alpha is None:
        alpha = torch.rand(real_images.shape[0], 1, 1, 1, device=real_images.device, generator=generator)
    mixed = (alpha * real_images.detach() + (1 - alpha) * fake_images.detach()).requires_grad_(True)
    logits = discriminator(mixed, labels)
    (grad,) = torch.autograd.grad(logits.float().sum(), mixed, create_graph=True)
    penalty = (grad.float().reshape(grad.shape[0] // pack, -1).norm(dim=1) - 1).square().mean()
    return penalty, {"Penalty/GP": penalty.detach()}


def lazy_adam(lr: float, betas: tuple, interval: int):
    """Adam lr and betas for a regularizer applied every `interval` steps (StyleGAN2-ADA, Karras et al. 2020)."""
    if interval <= 1:
        return lr, tuple(betas)
    c = interval / (interval + 1)
    return lr * c, tuple(b**c for b in betas)
