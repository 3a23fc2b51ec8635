"""Atom wrappers: AtomConv2d (filter or channel atoms) and AtomLinear (channel atoms).

Like peft's tuner layers, a wrapper keeps the original module as ``base_layer`` (frozen, its
weight never copied), exposes ``get_delta_weight`` and has three forward cases: atoms
disabled (the base layer, unmerged first if needed), merged (the base layer), otherwise ONE
convolution/matmul with the summed weight W0 + delta.

Parameters are named ``atoms_*``: ``atoms_delta`` ΔD (trainable, zero-initialised; as many
atoms as are degrees of freedom, see :func:`effective_atoms`),
``atoms_beta`` β and ``atoms_sub`` D1 (overcomplete option), buffers ``atoms_d0`` (the atoms
D0, saved with the adapter) and the frozen coefficients, not saved: ``atoms_pinv`` P = pinv(D0)
(linear coder) or ``atoms_alpha`` α (lasso coder). The math is :mod:`sdatom.atoms.method`, the
forward is one call of the kernel dispatch :func:`sdatom.atoms.kernels.apply`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from sdatom.atoms import decompose as dec
from sdatom.atoms import kernels
from sdatom.atoms import method as mth
from sdatom.atoms.config import AtomConfig
from sdatom.atoms.devices import supports_float64
from sdatom.errors import AdapterError

PREFIX = "atoms_"


def atom_shapes(module: nn.Module, config: AtomConfig, mode: str) -> dict[str, tuple[int, ...]]:
    """Shapes of a layer's trainable tensors and of its stored atoms ``atoms_d0``.

    ``mode`` is ``"filter"`` (conv filter atoms) or ``"channel"`` (channel atoms). The layers
    create exactly these tensors, so counting from them needs no weights (meta device works).
    Raises ValueError with the reason when the layer cannot take that kind of atoms.
    """
    w = module.weight
    if mode == "filter":
        kh, kw = w.shape[2], w.shape[3]
        kk = kh * kw
        m = effective_atoms(config.num_atoms or kk, kk, config.coder)
        shapes = {"atoms_delta": (m, kk)}
        if config.num_sub_atoms:
            m1 = config.num_sub_atoms
            shapes["atoms_beta"] = (w.shape[1] * m, m1)
            shapes["atoms_sub"] = (m * m1, kh, kw)
        shapes["atoms_d0"] = (m, kk)
        return shapes
    kc = config.channel_block
    if w.dim() == 4 and tuple(w.shape[2:]) != (1, 1):
        raise ValueError(
            f"channel atoms need a Linear or a 1x1 conv, not a {tuple(w.shape[2:])} kernel"
        )
    if w.shape[0] % kc or w.shape[1] % kc:
        raise ValueError(f"weight {tuple(w.shape[:2])} is not divisible into {kc}x{kc} blocks")
    kk = kc * kc
    m = effective_atoms(config.num_channel_atoms, kk, config.coder)
    return {"atoms_delta": (m, kk), "atoms_d0": (m, kk)}


def effective_atoms(m: int, d: int, coder: str) -> int:
    """How many atoms a layer gets so that every trainable number is a degree of freedom.

    Linear coder: the update is R0·(P·ΔD) and P = pinv(D0) has rank min(m, d), so atoms
    beyond a complete basis (m > d) add parameters but no freedom: min(m, d) atoms (a 1×1
    conv gets one gain, a k_c×k_c channel-atom layer the k_c²×k_c² mix). Lasso coder: α·ΔD
    with a full-column-rank α keeps all m, except for 1×1 kernels (d = 1), whose scalar atoms
    are all collinear and get identical codes: one atom.
    """
    if coder == "linear":
        return min(m, d)
    return 1 if d == 1 else m


class AtomLayer(nn.Module):
    """Shared logic of the atom wrappers: decomposition, delta, merge/unmerge, forward."""

    def __init__(
        self,
        base_layer: nn.Module,
        config: AtomConfig,
        mode: str,
        *,
        name: str = "",
        cache_dir: Any = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.atom_config = config
        self.atom_mode = mode
        self.atom_name = name
        self.merged = False
        self.disabled = False
        # A CPU copy of W0, kept only by a reversible merge of the linear coder.
        self._unmerged_weight: torch.Tensor | None = None
        weight = base_layer.weight
        shapes = atom_shapes(base_layer, config, mode)
        factory = {"device": weight.device, "dtype": torch.float32}
        self.atoms_delta = nn.Parameter(torch.zeros(shapes["atoms_delta"], **factory))
        if "atoms_beta" in shapes:
            beta = torch.randn(shapes["atoms_beta"], generator=torch.Generator().manual_seed(seed))
            beta = beta / math.sqrt(shapes["atoms_beta"][1])
            self.atoms_beta = nn.Parameter(beta.to(**factory))
            self.atoms_sub = nn.Parameter(torch.zeros(shapes["atoms_sub"], **factory))
        else:
            self.atoms_beta = self.atoms_sub = None
        self.register_buffer("atoms_d0", torch.zeros(shapes["atoms_d0"], **factory))
        # the frozen coefficients: P (linear coder) or α (lasso coder), rebuilt from D0
        self.register_buffer(self._coef_name, torch.zeros(0, **factory), persistent=False)
        self.atom_update = mth.Update(mode, config.coder, config.channel_block)
        self._cache_dir = cache_dir
        if not weight.is_meta:
            self.set_atoms(None)

    # -- decomposition
    @property
    def _coef_name(self) -> str:
        return "atoms_pinv" if self.atom_config.coder == "linear" else "atoms_alpha"

    @property
    def atoms_coefficients(self) -> torch.Tensor:
        """The frozen coefficients: P = pinv(D0) (linear coder) or α (lasso coder)."""
        return getattr(self, self._coef_name)

    def _rows_of(self, w: torch.Tensor) -> torch.Tensor:
        if self.atom_mode == "filter":
            return mth.filter_rows(w)
        return mth.channel_rows(w.reshape(w.shape[0], w.shape[1]), self.atom_config.channel_block)

    @torch.no_grad()
    def set_atoms(self, atoms: torch.Tensor | None) -> None:
        """(Re)build D0 and the frozen coefficients; ``atoms`` given = use these D0 (loading)."""
        if self.merged:
            raise AdapterError(f"{self.atom_name}: cannot change atoms while merged")
        cfg = self.atom_config
        rows = self._rows_of(self.base_layer.weight.detach())
        m = self.atoms_d0.shape[0]
        if cfg.coder == "linear":
            d0 = mth.linear_atoms(rows, m) if atoms is None else atoms.detach().float().cpu()
            coef = mth.projector(d0)
        else:
            d0, coef = dec.lasso_decompose(
                rows,
                m,
                lam=cfg.lasso_lambda,
                dict_iters=cfg.dict_iters,
                iters=cfg.lasso_iters,
                seed=cfg.seed,
                cache_dir=self._cache_dir,
                atoms=atoms,
            )
        if tuple(d0.shape) != tuple(self.atoms_d0.shape):
            raise AdapterError(
                f"{self.atom_name}: atoms of shape {tuple(d0.shape)} do not fit "
                f"{tuple(self.atoms_d0.shape)}"
            )
        device = self.base_layer.weight.device
        self.atoms_d0 = d0.to(device=device, dtype=torch.float32).contiguous()
        setattr(self, self._coef_name, coef.to(device=device, dtype=torch.float32).contiguous())

    def fit_report(self) -> dict[str, float]:
        """Reconstruction error ‖R − αD0‖/‖R‖ and sparsity of α for this layer."""
        rows = self._rows_of(self.original_weight().float())
        coef = self.atoms_coefficients
        alpha = rows @ coef if self.atom_config.coder == "linear" else coef
        return dec.fit_stats(rows, self.atoms_d0, alpha)

    # -- delta
    def atom_factors(self) -> list[torch.Tensor]:
        """ΔD, the coefficients (P or α), then β and D1 with sub-atoms."""
        fs = [self.atoms_delta, self.atoms_coefficients]
        if self.atoms_beta is not None:
            fs += [self.atoms_beta, self.atoms_sub]
        return fs

    def get_delta_weight(self) -> torch.Tensor:
        """The weight update (float32, shaped like the base weight) of the current atoms."""
        return self.atom_update.delta(self.original_weight(), *self.atom_factors())

    @torch.no_grad()
    def original_weight(self) -> torch.Tensor:
        """W0, the base weight without the atoms: the parameter itself unless merged; a merged
        layer recomputes it (a transient tensor, nothing is kept for it)."""
        weight = self.base_layer.weight
        if not self.merged:
            return weight.detach()
        if self._unmerged_weight is not None:  # reversible merge: bit-exact
            return self._unmerged_weight.to(weight.device)
        if self.atom_config.coder == "lasso":  # α·ΔD does not depend on W0
            delta = self.atom_update.delta(weight.detach(), *self.atom_factors())
            return weight.float() - delta.float()
        return self._invert_linear_merge(weight.detach())

    def _invert_linear_merge(self, merged: torch.Tensor) -> torch.Tensor:
        """W0 from W' = W0·A (linear coder; A = I + P·ΔD on the tap or block axis, per input
        channel with sub-atoms): one small solve, exact up to the merged weight's rounding."""
        ft = torch.float64 if supports_float64(merged.device) else torch.float32
        pinv = self.atoms_pinv.to(ft)
        m = mth.mix(pinv, self.atoms_delta.to(ft))  # M (d, d)
        eye = torch.eye(m.shape[0], dtype=ft, device=m.device)
        if self.atom_mode == "channel":
            block = self.atom_config.channel_block
            rows = mth.channel_rows(merged.reshape(merged.shape[0], merged.shape[1]).to(ft), block)
            rows0 = torch.linalg.solve(eye + m, rows, left=False)
            return mth.channel_unrows(rows0, merged.shape, block)
        c_out, c_in = merged.shape[0], merged.shape[1]
        kk = m.shape[0]
        if self.atoms_beta is None:
            a = (eye + m)[None]  # one A = I + M for every input channel
        else:
            per_channel = mth.channel_atoms(
                self.atoms_delta.to(ft), self.atoms_beta.to(ft), self.atoms_sub.to(ft)
            )
            a = eye + mth.mix(pinv, per_channel)  # A_c = I + M_c
        rows = merged.to(ft).reshape(c_out, c_in, kk).transpose(0, 1)  # (c_in, c_out, k²)
        try:
            w0 = torch.linalg.solve(a, rows, left=False)
        except RuntimeError:  # torch.linalg.LinAlgError: A is singular
            raise AdapterError(
                f"{self.atom_name}: cannot undo this merge (I + P·ΔD is singular); merge with "
                "reversible=True to unmerge exactly"
            ) from None
        return w0.transpose(0, 1).reshape(merged.shape).float()

    # -- merge
    @torch.no_grad()
    def merge(self, safe: bool = False, reversible: bool = False) -> None:
        """Fold the update into the base weight (safe: check finiteness on a copy first).

        Nothing weight-sized is kept: ``unmerge`` recomputes W0 (lasso coder: W' − α·ΔD;
        linear coder: W'·(I + P·ΔD)⁻¹, exact up to the merged weight's rounding).
        ``reversible=True`` (linear coder) keeps a CPU copy of W0 so that ``unmerge`` restores
        it bit for bit.
        """
        if self.merged:
            return
        weight = self.base_layer.weight
        delta = self.get_delta_weight().detach()
        merged = weight.float() + delta
        if safe and not torch.isfinite(merged).all():
            raise AdapterError(f"{self.atom_name}: merging the atoms gives non-finite weights")
        if reversible and self.atom_config.coder == "linear":
            self._unmerged_weight = weight.detach().to("cpu", copy=True)
        weight.copy_(merged.to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight (bit for bit after a reversible merge, else up to rounding)."""
        if not self.merged:
            return
        weight = self.base_layer.weight
        weight.copy_(self.original_weight().to(weight.dtype))
        self._unmerged_weight = None
        self.merged = False

    # -- forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        return kernels.apply(x, self.base_layer, self.atom_update, self.atom_factors())

    def extra_repr(self) -> str:
        return f"mode={self.atom_mode}, coder={self.atom_config.coder}, merged={self.merged}"


class AtomConv2d(AtomLayer):
    """A Conv2d with filter atoms (k×k atoms, or scalars for 1×1) or channel atoms (1×1)."""


class AtomLinear(AtomLayer):
    """A Linear with channel atoms on k_c×k_c blocks of its weight."""
