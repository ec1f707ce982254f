"""Image classification with the vision encoder: scikit-learn's digits (shipped with the package,
no download) split into train and test tensors, a training epoch, test accuracy.

``flash-depth vit-demo`` trains one encoder per depth mechanism on the same split, same order.
"""

from __future__ import annotations

import torch

from flash_depth.models import FlashDepthViTForImageClassification


def load_digits_split(test_fraction: float = 0.2, seed: int = 0):
    """The 1797 8x8 digits of ``sklearn.datasets.load_digits`` as ``[N, 1, 8, 8]`` float32 images
    (pixels 0..16 scaled to mean 0, std 1 over the training images) and int64 labels ``[N]``,
    shuffled by ``seed`` and split: ``(train_images, train_labels, test_images, test_labels)``.
    Raises ModuleNotFoundError without scikit-learn (the ``vision`` extra)."""
    if not isinstance(test_fraction, float) or not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be a float in (0, 1), got {test_fraction!r}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float()[:, None]
    labels = torch.from_numpy(digits.target).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    images, labels = images[order], labels[order]
    n_test = round(len(labels) * test_fraction)
    train, test = images[n_test:], images[:n_test]
    mean, std = train.mean(), train.std()
    return (train - mean) / std, labels[n_test:], (test - mean) / std, labels[:n_test]


def train_epoch(model: FlashDepthViTForImageClassification, optimizer: torch.optim.Optimizer,
                images: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator) -> float:
    """One pass over ``images [N, C, H, W]`` / ``labels [N]`` in shuffled batches (the last one
    smaller); returns the mean training loss."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    _check_images(images, labels)
    model.train()
    total = 0.0
    order = torch.randperm(len(labels), generator=generator)
    for start in range(0, len(labels), batch_size):
        idx = order[start:start + batch_size]
        loss = model(images[idx], labels=labels[idx]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total += loss.item() * len(idx)
    return total / len(labels)


def _check_images(images, labels) -> None:
    if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.dim() != 4:
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise TypeError(f"images must be a float tensor [N, C, H, W], got {got}")
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.long or labels.dim() != 1:
        got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise TypeError(f"labels must be an int64 tensor [N], got {got}")
    if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ValueError(f"images and labels must hold the same number N >= 1 of examples, got {images.shape[0]} "
                         f"and {labels.shape[0]}")


@torch.no_grad()
def accuracy(model: FlashDepthViTForImageClassification, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 512) -> float:
    """Fraction of ``images [N, C, H, W]`` whose argmax logit is their label ``[N]``."""
    _check_images(images, labels)
    model.eval()
    correct = sum(int((model(images[i:i + batch_size]).logits.argmax(-1) == labels[i:i + batch_size]).sum())
                  for i in range(0, len(labels), batch_size))
    return correct / len(labels)

