"""The ``cycle_gan`` scheme: CycleGAN (Zhu et al. 2017) in 3D, the "3D-CycleGAN" baseline of CG-3DSRGAN.

Domains, as the official code names them: **A = low dose**, **B = full dose**.

* ``G_A`` (A→B, low→full) is the recipe's ``model`` (generator ± heads ± refiner); it is the network
  ``ldt infer`` uses. ``D_A`` is the recipe's ``model.discriminator``; it scores full-dose images
  (real ones against ``G_A``'s outputs).
* ``G_B`` (B→A, full→low) and ``D_B`` (scores low-dose images) are owned by the scheme and listed in
  :attr:`extra_modules` (``generator_b``, ``discriminator_b``), so the engine checkpoints them.

``G_B`` is a deep copy of the recipe's generator (the generator only: no heads, no refiner) and ``D_B``
a deep copy of the discriminator, both re-initialised (:func:`reinitialise`): the same architecture and
hyper-parameters without the scheme needing the recipe's specs, and a fresh draw from torch's RNG, so a
seeded run is reproducible.

Per batch, in the official order (``cycle_gan_model.optimize_parameters``):

1. forward: ``fake_B = G_A(A)``, ``rec_A = G_B(fake_B)``, ``fake_A = G_B(B)``, ``rec_B = G_A(fake_A)``;
2. generator step ("generator" optimizer over G_A (+ heads, refiner) and G_B), both discriminators
   frozen::

       λ_GAN (gan_a + gan_b) + λ_cyc (cycle_a + cycle_b) + λ_cyc λ_idt (idt_a + idt_b) [+ recipe terms]

   with ``gan_a = LS(D_A(fake_B), real)``, ``cycle_a = |rec_A − A|₁``, ``idt_a = |G_A(B) − B|₁`` and
   symmetrically for B; λ_GAN is the recipe's adversarial loss weight;
3. discriminator step ("discriminator" optimizer over D_A and D_B):
   ``d_a = ½ [LS(D_A(B), real) + LS(D_A(pool_B(fake_B)), fake)]``, ``d_b`` likewise, where the pools
   are the image history buffers of Shrivastava et al. (2017) (:class:`ImagePool`).

Unpaired training on paired data: with ``unpaired: true`` the full-dose patches of a batch are
permuted (a random derangement drawn with ``torch.randperm``), so no low-dose patch meets its own
target in the adversarial, cycle and identity terms. With a batch of one there is nothing to permute
and the patches stay paired. Any non-adversarial recipe loss (e.g. ``{name: l1, on: pred}``, or a
cross-entropy on a dose head) is added to the generator's loss **against the true pairs** from the
batch: that term re-introduces paired supervision on purpose (a "supervised CycleGAN" hybrid); leave
``losses`` with only the adversarial term for the pure CycleGAN.

The discriminators must be unconditional (CycleGAN's D sees a single image; there is no paired
low-dose condition to give it).

Limitations: ``train.stages`` freezes only the recipe's parts (G_A, heads, refiner, D_A); G_B and D_B
train in every stage. The pools are saved in the checkpoint for an exact resume: 2 × ``pool_size``
patches (100 MiB for 64³ float32 patches and the default 50); under DDP each rank keeps its own pools
and rank 0's are saved.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lowdose_toolkit import hookimpl
from lowdose_toolkit.errors import RecipeError
from lowdose_toolkit.hookspecs import Register
from lowdose_toolkit.schemes import Scheme


def reinitialise(module: nn.Module) -> nn.Module:
    """Draw fresh parameters for ``module`` in place (from torch's RNG) and return it.

    A module that defines ``reset_parameters()`` (every torch layer does; a plugin with a custom
    initialisation should too) is reset as a whole; otherwise its children are visited. BatchNorm's
    reset also clears its running statistics. Parameters owned directly by a module without
    ``reset_parameters`` keep their (copied) values.
    """
    reset = getattr(module, "reset_parameters", None)
    if callable(reset):
        reset()
        return module
    for child in module.children():
        reinitialise(child)
    return module


class ImagePool:
    """History buffer of generated images (Shrivastava et al. 2017), as CycleGAN's ``ImagePool``.

    The discriminator is shown, for each generated image, with probability ½ that image and with
    probability ½ an older one from the buffer (which the new image then replaces), once the buffer
    is full; until then every image is stored and returned as is. ``size == 0`` disables the pool.
    Random draws use torch's global RNG, so a seeded run is reproducible.

    Args:
        size: Number of images kept (CycleGAN: 50).

    Example:
        >>> pool = ImagePool(2)
        >>> out = pool.query(torch.zeros(3, 1, 4, 4, 4))
        >>> len(pool), out.shape
        (2, torch.Size([3, 1, 4, 4, 4]))
    """

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"ImagePool: size={size} must be >= 0 (0 disables the pool)")
        self.size = size
        self.images: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        return f"ImagePool(size={self.size}, stored={len(self.images)})"

    @torch.no_grad()
    def query(self, images: torch.Tensor) -> torch.Tensor:
        """Return a batch the size of ``images`` ``[B, C, ...]``, mixing in stored ones (detached)."""
        images = images.detach()
        if self.size == 0:
            return images
        out = []
        for image in images:
            image = image.unsqueeze(0)
            if len(self.images) < self.size:
                self.images.append(image.clone())
                out.append(image)
            elif float(torch.rand(())) > 0.5:
                index = int(torch.randint(0, self.size, ()))
                out.append(self.images[index].clone())
                self.images[index] = image.clone()
            else:
                out.append(image)
        return torch.cat(out, dim=0)

    def state_dict(self) -> dict[str, Any]:
        return {"size": self.size, "images": [t.cpu() for t in self.images]}

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device | str = "cpu") -> None:
        if int(state["size"]) != self.size:
            raise RecipeError(
                f"train.scheme.pool_size: the checkpoint's image pool holds {state['size']} images, the recipe "
                f"says {self.size}; resume with pool_size: {state['size']}"
            )
        self.images = [t.to(device) for t in state["images"]]


def derangement(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A random permutation of ``range(n)`` with no fixed point (identity for ``n == 1``).

    ``order = randperm(n)``; item ``order[i]`` is sent to ``order[i + 1]`` (cyclically), so every
    derangement made of a single cycle is equally likely.
    """
    order = torch.randperm(n)
    perm = torch.empty(n, dtype=torch.long)
    perm[order] = order.roll(-1)
    return perm.to(device)


class CycleGAN(Scheme):
    """CycleGAN in 3D (Zhu et al. 2017): two generators, two unconditional discriminators, cycle + identity L1.

    Args:
        lambda_cycle: Weight of each cycle-consistency L1 term (Zhu et al.: λ = 10).
        lambda_identity: Identity L1 weight as a fraction of ``lambda_cycle`` (official code: 0.5,
            i.e. 5); 0 switches the identity terms off.
        pool_size: Images kept in each discriminator's history buffer (Zhu et al.: 50; 0 = none).
        unpaired: Permute the full-dose patches within each batch so that pairs are broken.
        d_loss_scale: Factor on each discriminator's real + fake loss (official code: 0.5).
    """

    phases = ("generator", "discriminator")

    def __init__(
        self,
        lambda_cycle: float = 10.0,
        lambda_identity: float = 0.5,
        pool_size: int = 50,
        unpaired: bool = True,
        d_loss_scale: float = 0.5,
        **context: object,
    ) -> None:
        super().__init__(**context)  # type: ignore[arg-type]
        if self.discriminator is None:
            raise RecipeError(
                "train.scheme: 'cycle_gan' needs model.discriminator (e.g. {name: patchgan3d, conditional: false})"
            )
        if getattr(self.discriminator, "conditional", False):
            raise RecipeError(
                "model.discriminator.conditional: 'cycle_gan' needs an unconditional discriminator (CycleGAN's D "
                "scores one image; unpaired data has no low-dose condition); set conditional: false"
            )
        adversarial = [t for t in self.losses if t.adversarial]
        if len(adversarial) != 1:
            raise RecipeError(
                f"losses: 'cycle_gan' needs exactly one adversarial loss (e.g. lsgan), found {len(adversarial)}"
            )
        for key, value in (("lambda_cycle", lambda_cycle), ("lambda_identity", lambda_identity),
                           ("d_loss_scale", d_loss_scale)):
            if value < 0:
                raise RecipeError(f"train.scheme.{key}: must be >= 0, got {value}")
        if pool_size < 0:
            raise RecipeError(f"train.scheme.pool_size: must be >= 0 (0 disables the pool), got {pool_size}")
        self.adversarial = adversarial[0]
        self.lambda_cycle = lambda_cycle
        self.lambda_identity = lambda_identity
        self.unpaired = unpaired
        self.d_loss_scale = d_loss_scale

        self.generator_b = reinitialise(copy.deepcopy(self.model.generator))
        self.discriminator_b = reinitialise(copy.deepcopy(self.discriminator))
        self.extra_modules = {"generator_b": self.generator_b, "discriminator_b": self.discriminator_b}
        self.extra_module_parts = {"generator_b": "generator", "discriminator_b": "discriminator"}
        self.g_b_net = self.wrap(self.generator_b)
        self.d_a_net = self.wrap(self.discriminator)
        self.d_b_net = self.wrap(self.discriminator_b)
        self.pool_a = ImagePool(pool_size)  # fake low-dose images, shown to D_B
        self.pool_b = ImagePool(pool_size)  # fake full-dose images, shown to D_A
        self.add_optimizer("generator", [*self.model.parameters(), *self.generator_b.parameters()])
        self.add_optimizer("discriminator", [*self.discriminator.parameters(), *self.discriminator_b.parameters()])

    def __repr__(self) -> str:
        return (
            f"CycleGAN(lambda_cycle={self.lambda_cycle}, lambda_identity={self.lambda_identity}, "
            f"pool_size={self.pool_a.size}, unpaired={self.unpaired}, adversarial={self.adversarial.name!r})"
        )

    def _g_a(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x, use_refiner=self.use_refiner)["pred"]

    def train_step(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        real_a = batch["low"]
        real_b = batch["full"]
        if self.unpaired and real_b.shape[0] > 1:
            real_b = real_b[derangement(real_b.shape[0], real_b.device)]
        adv, l1 = self.adversarial.loss, nn.functional.l1_loss
        lam_idt = self.lambda_cycle * self.lambda_identity

        # Generator step: both discriminators frozen and called unwrapped (no DDP gradient sync for them).
        with self.frozen(self.discriminator, self.discriminator_b), self.autocast():
            out = self.net(real_a, use_refiner=self.use_refiner)
            fake_b = out["pred"]
            rec_a = self.g_b_net(fake_b)
            fake_a = self.g_b_net(real_b)
            rec_b = self._g_a(fake_a)
            gan_a = adv(self.discriminator(fake_b).float(), True)
            gan_b = adv(self.discriminator_b(fake_a).float(), True)
            cycle_a = l1(rec_a.float(), real_a)
            cycle_b = l1(rec_b.float(), real_b)
            if lam_idt > 0:
                idt_a = l1(self._g_a(real_b).float(), real_b)
                idt_b = l1(self.g_b_net(real_a).float(), real_a)
            else:
                idt_a = idt_b = torch.zeros((), device=real_a.device)
            total, values = self.synthesis_losses(out, batch)  # recipe terms, against the true pairs
            total = (total + self.adversarial.weight * (gan_a + gan_b)
                     + self.lambda_cycle * (cycle_a + cycle_b) + lam_idt * (idt_a + idt_b))
        self.backward_step("generator", total)

        # Discriminator step, on pooled fakes.
        pooled_b = self.pool_b.query(fake_b)
        pooled_a = self.pool_a.query(fake_a)
        with self.autocast(), torch.set_grad_enabled(self.trains("discriminator")):
            d_a = self.d_loss_scale * (adv(self.d_a_net(real_b).float(), True)
                                       + adv(self.d_a_net(pooled_b).float(), False))
            d_b = self.d_loss_scale * (adv(self.d_b_net(real_a).float(), True)
                                       + adv(self.d_b_net(pooled_a).float(), False))
        self.backward_step("discriminator", d_a + d_b)

        for name, value in (("gan_a", gan_a), ("gan_b", gan_b), ("cycle_a", cycle_a), ("cycle_b", cycle_b),
                            ("idt_a", idt_a), ("idt_b", idt_b), ("d_a", d_a), ("d_b", d_b), ("total", total)):
            values[name] = float(value.detach())
        return values

    def state_dict(self) -> dict[str, Any]:
        """Optimizers, scalers and both image pools (so that a resumed run continues exactly)."""
        state = super().state_dict()
        state["pools"] = {"a": self.pool_a.state_dict(), "b": self.pool_b.state_dict()}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.pool_a.load_state_dict(state["pools"]["a"], self.device)
        self.pool_b.load_state_dict(state["pools"]["b"], self.device)


@hookimpl
def ldt_register_schemes(register: Register) -> None:
    register("cycle_gan", CycleGAN)
