"""Coders: split a layer's weight into atoms D0 and (frozen) coefficients.

The row layouts (filter rows, channel blocks) and the linear coder's D0 and P are the
method's own math (:mod:`sdatom.atoms.method`); this module adds the lasso coder, its cache
and the fit statistics. Two coders give R ≈ α·D0:

* ``linear``: D0 = the top right singular vectors of R (from the eigenvectors of the small
  Gram matrix RᵀR) and α = R·pinv(D0), never materialised: the layer stores P = pinv(D0) and
  its update is R·(P·ΔD). Exact when D0 spans the row space (m >= k²).
* ``lasso``: the paper's sparse coder: dictionary learning (orthogonal start, unit-norm atoms)
  then FISTA on 0.5·‖r − αD‖² + λ‖α‖₁ for every row at once; α is cached on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sdatom.atoms.method import (  # noqa: F401  (the layouts and D0/P, re-exported)
    channel_rows,
    channel_unrows,
    filter_rows,
    linear_atoms,
    projector,
)
from sdatom.fileio import atomic_path, cache_dir

logger = logging.getLogger(__name__)

_FISTA_CHUNK = 32768  # rows per FISTA block: keeps the iterates in cache
_DICT_SAMPLE = 16384  # rows used to learn the dictionary


# ----------------------------------------------------------------------------- lasso coder
def _soft_threshold_(z: torch.Tensor, thr: float) -> torch.Tensor:
    return z.sub_(z.clamp(-thr, thr))


def _fista(rows: torch.Tensor, atoms: torch.Tensor, lam: float, iters: int) -> torch.Tensor:
    """Solve min_α 0.5‖R − αD‖² + λ‖α‖₁ for all rows at once (blocks of rows stay in cache)."""
    gram = atoms @ atoms.T
    lipschitz = float(torch.linalg.eigvalsh(gram.double()).max().clamp_min(1e-12))
    step = 1.0 / lipschitz
    thr = lam * step
    pinv_t = projector(atoms)  # warm start at the least-squares code R·pinv(D)
    step_gram = torch.eye(gram.shape[0], dtype=gram.dtype) - step * gram
    out = torch.empty(rows.shape[0], atoms.shape[0], dtype=torch.float32)
    for start in range(0, rows.shape[0], _FISTA_CHUNK):
        r = rows[start : start + _FISTA_CHUNK].float()
        b = (r @ atoms.T).mul_(step)  # step·R·Dᵀ
        x = _soft_threshold_(r @ pinv_t, thr)
        y = x.clone()
        t = 1.0
        for it in range(iters):
            # prox-gradient step: x⁺ = soft(y − step·(y·G − R·Dᵀ)) = soft(y·(I − step·G) + b)
            x_new = _soft_threshold_(torch.addmm(b, y, step_gram), thr)
            t_new = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
            diff = x_new - x
            y = x_new + diff.mul_((t - 1.0) / t_new)
            if it % 10 == 9 and float(diff.norm()) <= 1e-5 * float(x_new.norm()) + 1e-12:
                x = x_new
                break
            x, t = x_new, t_new
        out[start : start + _FISTA_CHUNK] = x
    return out


def _learn_dictionary(
    rows: torch.Tensor, num_atoms: int, lam: float, rounds: int, seed: int
) -> torch.Tensor:
    """Dictionary learning on a strided sample of rows: orthogonal start, unit-norm atoms."""
    d = rows.shape[1]
    n = rows.shape[0]
    sample = rows[torch.linspace(0, n - 1, min(n, _DICT_SAMPLE)).long()].float()
    atoms = linear_atoms(sample, num_atoms)
    if num_atoms > d:  # beyond a complete basis: seeded random unit atoms
        gen = torch.Generator().manual_seed(seed)
        extra = torch.randn(num_atoms - d, d, generator=gen)
        atoms[d:] = extra / extra.norm(dim=1, keepdim=True).clamp_min(1e-12)
    for _ in range(rounds):
        alpha = _fista(sample, atoms, lam, iters=20)
        gram = (alpha.T @ alpha).double()
        ridge = 1e-8 * float(gram.diagonal().mean().clamp_min(1e-30))
        new = torch.linalg.solve(
            gram + ridge * torch.eye(num_atoms, dtype=gram.dtype), (alpha.T @ sample).double()
        ).float()
        norms = new.norm(dim=1, keepdim=True)
        used = norms.squeeze(1) > 1e-8
        atoms = torch.where(used[:, None], new / norms.clamp_min(1e-12), atoms)
    return atoms.contiguous()


def _solve_lasso(
    rows: torch.Tensor,
    num_atoms: int,
    lam: float,
    dict_iters: int,
    iters: int,
    seed: int,
    atoms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Atoms (learnt unless given) and the sparse codes α (N, m) of ``rows``."""
    if atoms is None:
        atoms = _learn_dictionary(rows, num_atoms, lam, dict_iters, seed)
    return atoms, _fista(rows, atoms.float(), lam, iters)


def default_cache_dir() -> Path:
    """``<sdatom cache>/lasso``: ``$SDATOM_CACHE``, else ``$XDG_CACHE_HOME/sdatom`` or
    ``~/.cache/sdatom`` (see :func:`sdatom.fileio.cache_dir`)."""
    return cache_dir() / "lasso"


def _tensor_digest(t: torch.Tensor) -> str:
    h = hashlib.blake2b(digest_size=16)
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(memoryview(t.view(torch.uint8).numpy()))
    return h.hexdigest()


def lasso_decompose(
    rows: torch.Tensor,
    num_atoms: int,
    *,
    lam: float,
    dict_iters: int,
    iters: int,
    seed: int,
    cache_dir: str | os.PathLike | None = None,
    atoms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lasso coder with an on-disk cache: returns (D0 (m, d), α (N, m)), both float32.

    The cache key is a hash of the rows' exact bytes and every setting (and of ``atoms``
    when given), so the solve runs once per base model. An unwritable cache only warns.
    """
    settings = {
        "m": num_atoms,
        "lam": lam,
        "dict_iters": dict_iters,
        "iters": iters,
        "seed": seed,
        "v": 1,
    }
    key = hashlib.blake2b(digest_size=20)
    key.update(_tensor_digest(rows).encode())
    key.update(json.dumps(settings, sort_keys=True).encode())
    if atoms is not None:
        key.update(_tensor_digest(atoms.float()).encode())
    path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = path / f"{key.hexdigest()}.safetensors"
    if path.is_file():
        try:
            cached = load_file(path)
            return cached["atoms"], cached["coef"]
        except (SafetensorError, OSError, KeyError) as exc:
            warnings.warn(
                f"{path}: unreadable lasso cache entry ({exc}); solving again", stacklevel=2
            )
    result = _solve_lasso(
        rows.detach().cpu(),
        num_atoms,
        lam,
        dict_iters,
        iters,
        seed,
        atoms=None if atoms is None else atoms.detach().cpu().float(),
    )
    try:
        with atomic_path(path) as tmp:
            save_file(
                {"atoms": result[0].contiguous(), "coef": result[1].contiguous()},
                str(tmp),
                metadata={k: str(v) for k, v in settings.items()},
            )
    except OSError as exc:
        warnings.warn(f"{path}: cannot write the lasso cache ({exc})", stacklevel=2)
    return result


def fit_stats(rows: torch.Tensor, atoms: torch.Tensor, coef: torch.Tensor) -> dict[str, float]:
    """Relative reconstruction error ‖R − αD0‖/‖R‖ and sparsity (fraction of zero α)."""
    rows = rows.float()
    err = (rows - coef.float() @ atoms.float()).norm() / rows.norm().clamp_min(1e-30)
    return {"rel_error": float(err), "sparsity": float((coef == 0).float().mean())}
