r"""Consistent batch augmentation: one random view per training batch, seen by the teachers and the student alike.

Beyer et al., *Knowledge distillation: A good teacher is patient and consistent* (CVPR 2022) found that a
student matches its teacher best when both see the *same* aggressively augmented view of each image at
every step ("function matching"), for a long schedule. The shared step runs the teachers and the student
on the same ``batch["input"]``, so a view drawn once per batch, after the batch reaches the device and
before the step (:meth:`~lightning_mtkd.data.MultiTaskDataModule.on_after_batch_transfer`), is shared by
every teacher and the student of every strategy.

A teacher's output then depends on the view, so it cannot be cached across epochs: a
:class:`~lightning_mtkd.callbacks.TeacherCache` that caches the training split is refused when an
augmentation is set (:func:`check_teacher_cache`); caching the validation split (``splits: [val]``) still works.

The maths lives in pure functions (:func:`random_shift`, :func:`mixup_inputs`, :func:`gaussian_noise`);
:class:`BatchAugment` only holds their settings and draws the randomness from ``(seed, step, rank)``, so
a resumed run draws exactly the views an uninterrupted one would have drawn.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_mtkd.tasks import IGNORE_INDEX

#: The batch key that says how many samples at the end of a batch are appended blends (``mixup_mode="append"``).
BLENDS = "blends"


def random_shift(inputs: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    r"""Each image translated by its own random offset :math:`(d_y, d_x) \in [-s, s]^2`, zero-filled.

    The image is zero-padded by :math:`s` and cropped back at a random position, which is the
    "random crop with padding" of Krizhevsky et al. (2012) and of the CIFAR recipes; one gather, no
    loop over samples.

    Args:
        inputs: ``(B, C, H, W)`` images.
        max_shift: :math:`s`, the largest offset in pixels (0 returns ``inputs``).
        generator: The source of the offsets (on the CPU).

    Example:
        >>> x = torch.arange(9.0).reshape(1, 1, 3, 3)
        >>> y = random_shift(x, 1, torch.Generator().manual_seed(0))
        >>> tuple(y.shape), bool(set(y.flatten().tolist()) <= set(x.flatten().tolist()) | {0.0})
        ((1, 1, 3, 3), True)
    """
    if max_shift == 0:
        return inputs
    if inputs.dim() != 4:
        raise ValueError(
            f"shift augments images (B, C, H, W), but the inputs have shape {tuple(inputs.shape)}; set shift=0 "
            "for inputs that are not images (mixup and noise work on any float inputs)."
        )
    batch, _, height, width = inputs.shape
    padded = torch.nn.functional.pad(inputs, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (2, batch), generator=generator).to(inputs.device)
    rows = offsets[0, :, None] + torch.arange(height, device=inputs.device)  # (B, H)
    cols = offsets[1, :, None] + torch.arange(width, device=inputs.device)  # (B, W)
    samples = torch.arange(batch, device=inputs.device)[:, None, None]
    # (B, H, W, C) by advanced indexing, back to (B, C, H, W).
    return padded.permute(0, 2, 3, 1)[samples, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def mixup_inputs(
    inputs: Tensor, concentration: float, fraction: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    r"""Mix a random ``fraction`` of the samples with random partners (mixup, Zhang et al., ICLR 2018).

    For a chosen sample :math:`i` with partner :math:`j` (a random permutation of the batch) and
    :math:`\lambda_i \sim \mathrm{Beta}(a, a)`: :math:`\tilde x_i = \lambda_i x_i + (1-\lambda_i) x_j`. The
    others are left as they are.

    Args:
        inputs: ``(B, ...)`` float inputs.
        concentration: :math:`a`, the Beta distribution's parameter (> 0; 1 is uniform).
        fraction: The share of the batch that is mixed, in [0, 1].
        generator: The source of the draws (on the CPU).

    Returns:
        The inputs, and a ``(B,)`` bool mask of the mixed samples.

    Example:
        >>> x, mixed = mixup_inputs(torch.eye(4), 1.0, 0.5, torch.Generator().manual_seed(0))
        >>> int(mixed.sum()), torch.allclose(x.sum(1), torch.ones(4))
        (2, True)
    """
    batch = inputs.shape[0]
    mixed = torch.zeros(batch, dtype=torch.bool)
    blends, chosen = mixup_blends(inputs, concentration, round(fraction * batch), generator)
    if len(chosen) == 0:
        return inputs, mixed.to(inputs.device)
    out = inputs.clone()
    out[chosen.to(inputs.device)] = blends
    mixed[chosen] = True
    return out, mixed.to(inputs.device)


def mixup_blends(inputs: Tensor, concentration: float, count: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    r"""``count`` new samples :math:`\lambda x_i + (1-\lambda) x_j`, :math:`\lambda \sim \mathrm{Beta}(a, a)`.

    :math:`i` runs over ``count`` distinct samples of the batch (at most ``B``), :math:`j` over random partners.

    Returns:
        The ``(count, ...)`` blends and the ``(count,)`` indices :math:`i` of their first sources (on the CPU).

    Example:
        >>> blends, sources = mixup_blends(torch.eye(4), 1.0, 3, torch.Generator().manual_seed(0))
        >>> tuple(blends.shape), torch.allclose(blends.sum(1), torch.ones(3)), len(set(sources.tolist()))
        ((3, 4), True, 3)
    """
    batch = inputs.shape[0]
    count = min(count, batch)
    if count == 0:
        return inputs[:0], torch.zeros(0, dtype=torch.long)
    chosen = torch.randperm(batch, generator=generator)[:count]
    partners = torch.randperm(batch, generator=generator)[:count]
    # torch.distributions.Beta takes no generator; the draws must come from ours (exact resume), hence _beta.
    lam = _beta(concentration, count, generator).to(inputs.dtype)
    lam = lam.reshape((count,) + (1,) * (inputs.dim() - 1)).to(inputs.device)
    chosen_d, partners_d = chosen.to(inputs.device), partners.to(inputs.device)
    return lam * inputs[chosen_d] + (1 - lam) * inputs[partners_d], chosen


def _beta(concentration: float, count: int, generator: torch.Generator) -> Tensor:
    """``count`` draws of Beta(a, a) from ``generator``: :math:`G_1/(G_1+G_2)` with Gamma(a) draws (Marsaglia–Tsang)."""
    first, second = _gamma(concentration, count, generator), _gamma(concentration, count, generator)
    return first / (first + second).clamp_min(torch.finfo(first.dtype).tiny)


def _gamma(shape: float, count: int, generator: torch.Generator) -> Tensor:
    """Gamma(shape, 1) draws by Marsaglia & Tsang (2000), vectorised with enough proposals to accept each one."""
    boost = shape < 1.0
    a = shape + 1.0 if boost else shape
    d = a - 1.0 / 3.0
    c = 1.0 / (9.0 * d) ** 0.5
    out = torch.empty(count)
    done = torch.zeros(count, dtype=torch.bool)
    while not bool(done.all()):
        z = torch.randn(count, generator=generator)
        u = torch.rand(count, generator=generator)
        v = (1.0 + c * z) ** 3
        ok = (v > 0) & (torch.log(u.clamp_min(1e-12)) < 0.5 * z**2 + d - d * v + d * torch.log(v.clamp_min(1e-12)))
        take = ok & ~done
        out[take] = (d * v)[take]
        done |= ok
    if boost:  # Gamma(a) = Gamma(a + 1) · U^(1/a)
        out = out * torch.rand(count, generator=generator).pow(1.0 / shape)
    return out


def gaussian_noise(inputs: Tensor, std: float, generator: torch.Generator) -> Tensor:
    r""":math:`x + \epsilon`, :math:`\epsilon \sim \mathcal N(0, \sigma^2)` per entry (for standardised table features).

    Example:
        >>> gaussian_noise(torch.zeros(2, 3), 0.0, torch.Generator()).abs().sum().item()
        0.0
    """
    if std == 0:
        return inputs
    return inputs + std * torch.randn(inputs.shape, generator=generator).to(inputs.device, inputs.dtype)


class BatchAugment:
    r"""A random view of each training batch, drawn once and shared by teachers and student (Beyer et al., CVPR 2022).

    In order: random shifts of up to ``shift`` pixels (images only), Gaussian noise of std ``noise`` (any
    float inputs), then mixup with ``Beta(mixup, mixup)`` weights. A mixed sample belongs to no class, so its
    labels are missing (``-100`` / ``NaN``): the supervised losses skip it and only the distillation terms
    reach it, the teacher labelling the mixed view ("function matching"). ``mixup_mode`` says where the mixed
    samples go:

    - ``"replace"``: a ``mixup_fraction`` of the batch is mixed in place, so those samples lose their labels;
    - ``"append"``: ``mixup_fraction`` × B mixed samples are *added* to the batch, which keeps every labelled
      sample: the mixed ones are extra unlabelled inputs, drawn from the data the module already has (each
      step costs that much more). Other per-sample tensors of the batch (``index``) follow the mixed sample's
      first source.

    A student trained from labels alone gets nothing from mixed samples: give it ``mixup=0``.

    The draws are a pure function of ``(seed, step, rank)``: resuming from a checkpoint gives the same views,
    and each DDP rank draws its own.

    Args:
        shift: Largest translation in pixels (0: none).
        noise: Std of the additive Gaussian noise (0: none).
        mixup: Beta concentration :math:`a` of the mixing weights (0: no mixup).
        mixup_fraction: Share of each batch that is mixed (``"replace"``), or the number of mixed samples added
            per labelled one (``"append"``).
        mixup_mode: ``"replace"`` or ``"append"`` (above).
        seed: Seed of the draws.

    YAML::

        data:
          class_path: lightning_mtkd.data.MultiMNISTDataModule
          init_args:
            augment: {class_path: lightning_mtkd.data.BatchAugment, init_args: {shift: 2, mixup: 1.0}}

    Example:
        >>> batch = {"input": torch.rand(4, 1, 8, 8), "targets": {"a": torch.arange(4)}, "index": torch.arange(4)}
        >>> out = BatchAugment(shift=1, mixup=1.0, mixup_fraction=0.5)(batch, step=0)
        >>> tuple(out["input"].shape), int((out["targets"]["a"] == -100).sum())
        ((4, 1, 8, 8), 2)
    """

    def __init__(
        self,
        shift: int = 0,
        noise: float = 0.0,
        mixup: float = 0.0,
        mixup_fraction: float = 0.5,
        mixup_mode: Literal["replace", "append"] = "replace",
        seed: int = 0,
    ) -> None:
        if shift < 0:
            raise ValueError(f"shift must be >= 0 pixels, got {shift}.")
        if noise < 0:
            raise ValueError(f"noise is a standard deviation and must be >= 0, got {noise}.")
        if mixup < 0:
            raise ValueError(f"mixup is the Beta concentration and must be >= 0 (0 turns mixup off), got {mixup}.")
        if not 0.0 <= mixup_fraction <= 1.0:
            raise ValueError(f"mixup_fraction must lie in [0, 1], got {mixup_fraction}.")
        if mixup_mode not in ("replace", "append"):
            raise ValueError(
                f"mixup_mode must be 'replace' (mix samples in place) or 'append' (add mixed samples), got "
                f"{mixup_mode!r}."
            )
        self.shift = int(shift)
        self.noise = float(noise)
        self.mixup = float(mixup)
        self.mixup_fraction = float(mixup_fraction)
        self.mixup_mode = mixup_mode
        self.seed = int(seed)

    @property
    def keeps_originals(self) -> bool:
        """Whether the batch's own samples pass unchanged (only appended blends): a teacher cache still holds."""
        return self.mixup_mode == "append" and self.shift == 0 and self.noise == 0

    def __repr__(self) -> str:
        return (
            f"BatchAugment(shift={self.shift}, noise={self.noise}, mixup={self.mixup}, "
            f"mixup_fraction={self.mixup_fraction}, mixup_mode={self.mixup_mode!r}, seed={self.seed})"
        )

    def __call__(self, batch: Mapping[str, Any], step: int, rank: int = 0) -> dict[str, Any]:
        """The batch with an augmented ``input`` (and the mixed samples' labels missing); the rest unchanged."""
        inputs = batch["input"]
        if not isinstance(inputs, Tensor) or not inputs.is_floating_point():
            raise TypeError(
                "BatchAugment augments a float Tensor input; this batch's input is "
                f"{type(inputs).__name__ if not isinstance(inputs, Tensor) else inputs.dtype}. Token ids or dict "
                "inputs cannot be shifted or mixed: drop `augment`."
            )
        if self.shift:
            dense = [name for name, target in batch["targets"].items() if target.dim() >= 3]
            if dense:
                raise ValueError(
                    f"BatchAugment(shift={self.shift}) would move the images but not the dense targets of "
                    f"{dense} (per-pixel maps), so labels and pixels would no longer line up. Set shift=0 for "
                    "dense tasks (noise and mixup keep them aligned)."
                )
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 1_009 + rank)
        out = random_shift(inputs, self.shift, generator)
        out = gaussian_noise(out, self.noise, generator)
        targets = batch["targets"]
        if self.mixup > 0 and self.mixup_mode == "append":
            return _append_blends(batch, out, self.mixup, self.mixup_fraction, generator)
        if self.mixup > 0:
            out, mixed = mixup_inputs(out, self.mixup, self.mixup_fraction, generator)
            targets = {name: _mark_missing(target, mixed) for name, target in targets.items()}
        return {**batch, "input": out, "targets": targets}


def _append_blends(
    batch: Mapping[str, Any], inputs: Tensor, concentration: float, fraction: float, generator: torch.Generator
) -> dict[str, Any]:
    """``batch`` with ``inputs`` and, after them, mixed samples whose targets are missing."""
    size = inputs.shape[0]
    blends, sources = mixup_blends(inputs, concentration, round(fraction * size), generator)
    sources = sources.to(inputs.device)

    def extend(value: Any) -> Any:  # other per-sample tensors (index) follow the blend's first source
        return torch.cat([value, value[sources]]) if isinstance(value, Tensor) and value.shape[:1] == (size,) else value

    targets = {name: torch.cat([target, _missing(target[sources])]) for name, target in batch["targets"].items()}
    rest = {key: extend(value) for key, value in batch.items() if key not in ("input", "targets")}
    # BLENDS: how many samples at the end are blends (a plain int: no sync), so a teacher cache can serve the rest.
    return {**rest, "input": torch.cat([inputs, blends]), "targets": targets, BLENDS: len(sources)}


def _missing(target: Tensor) -> Tensor:
    return torch.full_like(target, _missing_value(target))


def _missing_value(target: Tensor) -> float:
    """What marks a missing label, read off the target's dtype: NaN for real values, -100 for class ids."""
    return torch.nan if target.is_floating_point() else IGNORE_INDEX


def _mark_missing(target: Tensor, mixed: Tensor) -> Tensor:
    shape = (-1,) + (1,) * (target.dim() - 1)
    return torch.where(mixed.reshape(shape), torch.as_tensor(_missing_value(target), dtype=target.dtype), target)


def check_teacher_cache(trainer: Any, augment: BatchAugment) -> None:
    """Refuse a :class:`~lightning_mtkd.callbacks.TeacherCache` that caches the training split, unless the
    augmentation leaves the batch's own samples as they are (:attr:`BatchAugment.keeps_originals`).

    With a batch augmentation every training step shows the teachers a new view, so their outputs for a sample
    change from epoch to epoch; a cache would hand the student the outputs of an old view (inconsistent teaching).
    Appended blends alone change no sample: the cache serves the samples, and the teachers label the blends.
    """
    from lightning_mtkd.callbacks.teacher_cache import TeacherCache

    if augment.keeps_originals:
        return
    for callback in getattr(trainer, "callbacks", []):
        if isinstance(callback, TeacherCache) and "train" in callback.splits:
            raise RuntimeError(
                "the DataModule augments every training batch (`augment`), so the teachers' outputs depend on the "
                "view drawn at each step and cannot be cached, but a TeacherCache caches the 'train' split. Cache "
                "the validation split only (TeacherCache(splits=['val'])), drop the cache, or drop `augment`."
            )
