"""Layer-by-layer distances over a teacher's trajectories (representational and functional)."""

from __future__ import annotations

import io
import zipfile
from tokenize import TokenError
from typing import Iterable

import numpy as np
import torch

from raptor import storage
from raptor.errors import MissingInput, UserError
from raptor.models.teacher import Teacher, TokenGeometry, autocast

METRICS = ("cosine", "mse", "cka", "swap")
MAX_DISTANCE = 1e150  # sums, differences and plot scales of larger values overflow float64


def _as_batches(x: torch.Tensor | Iterable[torch.Tensor]) -> Iterable[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    return x


def _features(traj: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """[B, L+1, N, D] -> f_l = [cls, mean patch] for layers 1..L: [B, L, 2, D] (float64)."""
    t = traj[:, 1:].double()
    return torch.stack([t[:, :, 0], t[:, :, num_prefix:].mean(dim=2)], dim=2)


def _hsic1(K: torch.Tensor, Lm: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC (Song et al. 2012) between stacks of Gram matrices: K [A, n, n], Lm [C, n, n] -> [A, C]."""
    n = K.shape[-1]
    K = K.clone()
    Lm = Lm.clone()
    K.diagonal(dim1=-2, dim2=-1).zero_()
    Lm.diagonal(dim1=-2, dim2=-1).zero_()
    KL = torch.einsum("aij,cij->ac", K, Lm)  # trace(K L) with symmetric L
    sK, sL = K.sum(dim=(-2, -1)), Lm.sum(dim=(-2, -1))
    rK, rL = K.sum(dim=-1), Lm.sum(dim=-1)  # [A, n], [C, n]
    middle = rK @ rL.T
    return (KL + sK[:, None] * sL[None, :] / ((n - 1) * (n - 2)) - 2.0 * middle / (n - 2)) / (n * (n - 3))


@torch.no_grad()
def layer_distances(
    trajectories: torch.Tensor | Iterable[torch.Tensor],
    metric: str = "cosine",
    geometry: TokenGeometry | int | None = None,
) -> torch.Tensor:
    """L x L distances between layers 1..L, accumulated batch by batch in constant memory.

    Per image and layer, f_l = [cls token, mean of patch tokens] (registers excluded; needs the
    ``geometry`` or the number of prefix tokens, default 1 + 4 registers is NOT assumed: pass it).

    - ``cosine`` (the authors'): D[l, m] = sum over the two tokens of (1 - cos(f_l, f_m)), mean over images.
    - ``mse``: mean over images of the mean squared difference of f_l and f_m.
    - ``cka``: 1 - linear CKA of the [images x 2D] features, estimated as minibatch CKA
      (unbiased HSIC summed over batches, Nguyen et al. 2021); batches need >= 4 images.

    For the functional distance see :func:`swap_distances`.
    """
    if metric not in ("cosine", "mse", "cka"):
        raise ValueError(f"metric must be cosine|mse|cka (swap: use swap_distances), got {metric!r}")
    if geometry is None:
        raise ValueError("layer_distances needs geometry= (teacher.geometry) or the number of prefix tokens")
    num_prefix = geometry if isinstance(geometry, int) else geometry.num_prefix
    acc = None
    count = 0
    hsic_xy = None
    for traj in _as_batches(trajectories):
        if traj.ndim != 4:
            raise ValueError(f"trajectories must be [B, L+1, N, D], got {tuple(traj.shape)}")
        f = _features(traj, num_prefix)  # [B, L, 2, D]
        B, L = f.shape[:2]
        if metric == "cosine":
            u = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            cos = torch.einsum("bltd,bmtd->lm", u, u)  # summed over images and the two tokens
            part = 2.0 * B - cos
        elif metric == "mse":
            sq = f.pow(2).sum(dim=(-1, -2))  # [B, L]
            dot = torch.einsum("bltd,bmtd->blm", f, f)
            part = (sq[:, :, None] + sq[:, None, :] - 2 * dot).sum(0) / (2 * f.shape[-1])
        else:
            if B < 4:
                raise ValueError("cka needs batches of at least 4 images")
            X = f.reshape(B, L, -1).transpose(0, 1)  # [L, B, 2D]
            G = X @ X.transpose(1, 2)  # [L, B, B]
            h = _hsic1(G, G)
            hsic_xy = h if hsic_xy is None else hsic_xy + h
            count += B
            continue
        acc = part if acc is None else acc + part
        count += B
    if count == 0:
        raise ValueError("no trajectories given")
    if metric == "cka":
        d = hsic_xy.diagonal()
        cka = hsic_xy / (d[:, None] * d[None, :]).clamp_min(1e-300).sqrt()
        out = 1.0 - cka
    else:
        out = acc / count
    out = 0.5 * (out + out.T)
    out.fill_diagonal_(0.0)
    return out.float()


@torch.no_grad()
def swap_distances(
    teacher: Teacher,
    images: torch.Tensor | Iterable[torch.Tensor],
    *,
    amp: bool | torch.dtype = False,
    symmetric: bool = True,
) -> torch.Tensor:
    """Functional distance: how well teacher block i does block j's job on block j's own inputs.

    S[i, j] = sum ||f_i(a_{j-1}) - f_j(a_{j-1})||^2 / sum ||a_j - a_{j-1}||^2 (sums over images,
    tokens, features; f_j(a_{j-1}) = a_j), returned symmetrised (S + S^T) / 2, zero diagonal.
    Costs L^2 block applications per batch. ``images`` is a batch or an iterable of batches.
    """
    L = teacher.depth
    num = torch.zeros(L, L, dtype=torch.float64)
    den = torch.zeros(L, dtype=torch.float64)
    seen = False
    for batch in _as_batches(images):
        batch = batch.to(teacher.device)
        traj = teacher.trajectory(batch, amp=amp)
        seen = True
        with autocast(batch.device, amp):
            for j in range(L):
                x, y = traj[:, j], traj[:, j + 1]
                den[j] += (y - x).double().pow(2).sum().cpu()
                for i in range(L):
                    if i == j:
                        continue
                    out = teacher.blocks[i](x).float()
                    num[i, j] += (out - y).double().pow(2).sum().cpu()
    if not seen:
        raise ValueError("no images given")
    S = num / den.clamp_min(1e-30)[None, :]
    if symmetric:
        S = 0.5 * (S + S.T)
    S.fill_diagonal_(0.0)
    return S.float()


def load_distances(url: str) -> np.ndarray:
    """The L x L float64 distance matrix stored at ``url`` (.npy); whatever else the file holds is a
    one-line :class:`~raptor.errors.UserError` naming it (the segmentation's own checks would not name it)."""
    try:
        with storage.open_file(url, "rb") as f:
            d = np.load(io.BytesIO(f.read()), allow_pickle=False)
    except FileNotFoundError:
        raise MissingInput(f"{url}: no such file") from None
    except (IsADirectoryError, PermissionError) as e:
        raise UserError(f"{url}: cannot read it ({e.strerror or type(e).__name__})") from None
    except (ValueError, EOFError, OSError, SyntaxError, TokenError, zipfile.BadZipFile) as e:  # numpy parses the header with ast
        raise UserError(f"{url}: not a .npy matrix ({' '.join(str(e).split()) or type(e).__name__})") from None
    if not isinstance(d, np.ndarray):  # an .npz archive
        raise UserError(f"{url}: an .npz archive, not a .npy matrix")
    if d.dtype.kind not in "biuf":
        raise UserError(f"{url}: expected real numbers, got dtype {d.dtype}")
    if d.ndim != 2 or d.shape[0] != d.shape[1] or d.size == 0:
        raise UserError(f"{url}: expected a non-empty square L x L matrix, got shape {d.shape}")
    d = d.astype(np.float64)
    if not np.isfinite(d).all():
        raise UserError(f"{url}: the distances contain NaN or infinity")
    if np.abs(d).max() > MAX_DISTANCE:  # sums, differences and plot scales of such values overflow float64
        raise UserError(f"{url}: distances beyond ±{MAX_DISTANCE:g} (largest {np.abs(d).max():g})")
    return d
