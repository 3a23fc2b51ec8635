"""The method (DESIGN §1, arXiv 2403.00269): filter atoms, their coefficients, a layer's update.

A k×k conv weight W (c_out, c_in, k, k) is N = c_out·c_in spatial filters, the rows of
R = W.reshape(N, k²); a 2-D weight (out, in) is cut into k_c×k_c blocks, the rows of
B (out/k_c · in/k_c, k_c²). Either way R ≈ α·D0 with m atoms D0 (m, d) shared by the layer.
Only the atoms are tuned, through a zero-initialised ΔD: W' = W0 + α·ΔD.

Linear coder (the default): D0 = the top right singular vectors of R and α = R·P with
P = pinv(D0) (d, m), so the update is R0·(P·ΔD) = R0·M: the pre-trained filters times ONE
d×d matrix M per layer (the *tap mix* of a filter layer, the *block mix* of a channel layer).
The adapted weight is W0·(I + M) on the tap (or block) axis. Lasso coder (the paper's): α
(N, m) from a sparse-coding solve (:mod:`sdatom.atoms.decompose`), update α·ΔD.

Overcomplete atoms: atom slot j becomes input-channel specific,
ΔD_c[j] = ΔD[j] + Σ_a β[c, j, a]·D1[j, a]; with the linear coder M_c = P·ΔD_c per channel.

Everything here is plain autograd-differentiable torch; the fast kernels that apply an update
without building it live in :mod:`sdatom.atoms.kernels`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdatom.atoms.devices import HOST


# ----------------------------------------------------------------------------- layouts
def filter_rows(weight: torch.Tensor) -> torch.Tensor:
    """R = W.reshape(c_out·c_in/groups, k²)."""
    return weight.reshape(weight.shape[0] * weight.shape[1], -1)


def channel_rows(weight: torch.Tensor, block: int) -> torch.Tensor:
    """The k_c×k_c blocks of a 2-D (or 1×1 conv) weight as rows (n_blocks, k_c²)."""
    out_f, in_f = weight.shape[0], weight.shape[1]
    w = weight.reshape(out_f // block, block, in_f // block, block)
    return w.permute(0, 2, 1, 3).reshape(-1, block * block)


def channel_unrows(rows: torch.Tensor, shape: torch.Size, block: int) -> torch.Tensor:
    """Inverse of :func:`channel_rows`: assemble block rows into a weight of ``shape``."""
    out_f, in_f = shape[0], shape[1]
    w = rows.reshape(out_f // block, in_f // block, block, block).permute(0, 2, 1, 3)
    return w.reshape(shape)


# ----------------------------------------------------------------------------- D0 and P
def linear_atoms(rows: torch.Tensor, num_atoms: int) -> torch.Tensor:
    """D0 (m, d) of the linear coder: the top right singular vectors of ``rows``.

    From the d×d Gram matrix (one pass over the weight; the float64 eigensolve on the CPU,
    since MPS has no float64). Signs are fixed so the result is deterministic. With m > d
    the basis repeats cyclically (unit-norm atoms, still spanning the row space).
    """
    d = rows.shape[1]
    gram = (rows.T.float() @ rows.float()).to(HOST, torch.float64)
    _, vecs = torch.linalg.eigh(gram)
    basis = vecs.flip(-1).T  # (d, d), descending singular values
    idx = basis.abs().argmax(dim=1, keepdim=True)
    basis = basis * torch.gather(basis, 1, idx).sign()
    order = torch.arange(num_atoms) % d
    return basis[order].to(torch.float32).contiguous()


def projector(atoms: torch.Tensor) -> torch.Tensor:
    """P = pinv(D0) (d, m): the linear coder's coefficients are α = R·P."""
    host = atoms.to(HOST, torch.float64)
    return torch.linalg.pinv(host).to(atoms.dtype).contiguous()


# ----------------------------------------------------------------------------- the update
def channel_atoms(
    delta_atoms: torch.Tensor, beta: torch.Tensor, sub_atoms: torch.Tensor
) -> torch.Tensor:
    """Overcomplete option: ΔD_c = ΔD + Σ_a β[c, :, a]·D1[:, a], shape (c_in, m, d).

    ``beta`` (c_in·m, m1), ``sub_atoms`` D1 (m·m1, k, k)."""
    m, d = delta_atoms.shape
    m1 = beta.shape[1]
    return delta_atoms + torch.einsum(
        "cja,jaq->cjq", beta.reshape(-1, m, m1), sub_atoms.reshape(m, m1, d)
    )


def mix(pinv: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
    """M = P·ΔD (d, d), or (c_in, d, d) for per-channel atoms (c_in, m, d)."""
    return torch.matmul(pinv.to(atoms.dtype), atoms)


@dataclass(frozen=True)
class Update:
    """How a layer's factors (ΔD, P or α[, β, D1]) make its weight update."""

    kind: str  # "filter" (conv filter atoms) or "channel" (k_c×k_c channel atoms)
    coder: str  # "linear" (coefficients P) or "lasso" (coefficients α)
    block: int = 0  # k_c of channel atoms

    def delta(
        self,
        weight: torch.Tensor,
        delta_atoms: torch.Tensor,
        coef: torch.Tensor,
        beta: torch.Tensor | None = None,
        sub_atoms: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The update of ``weight`` (W0) in ΔD's dtype, shaped like W0. ``coef`` is P for the
        linear coder, α for the lasso coder."""
        dt = delta_atoms.dtype
        coef = coef.to(dt)
        if self.kind == "channel":
            if self.coder == "linear":
                rows = channel_rows(weight.to(dt), self.block) @ mix(coef, delta_atoms)
            else:
                rows = coef @ delta_atoms
            return channel_unrows(rows, weight.shape, self.block)
        c_out, c_in = weight.shape[0], weight.shape[1]
        m, d = delta_atoms.shape
        if beta is None or sub_atoms is None:
            if self.coder == "linear":
                out = filter_rows(weight.to(dt)) @ mix(coef, delta_atoms)
            else:
                out = coef @ delta_atoms
            return out.reshape(weight.shape)
        per_channel = channel_atoms(delta_atoms, beta, sub_atoms)  # (c_in, m, d)
        if self.coder == "linear":
            w = weight.reshape(c_out, c_in, d).to(dt)
            out = torch.einsum("ocp,cpq->ocq", w, mix(coef, per_channel))
        else:
            out = torch.einsum("ocj,cjq->ocq", coef.reshape(c_out, c_in, m), per_channel)
        return out.reshape(weight.shape)
