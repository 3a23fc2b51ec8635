"""AtomConfig: which layers get atoms and how the atoms are built."""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sdatom.errors import ConfigError

Patterns = str | tuple[str, ...] | None

CODERS = ("linear", "lasso")


@dataclass(frozen=True)
class AtomConfig:
    """Settings of the filter-atom adapter (validated on creation, immutable).

    Fields:
        coder: how the frozen coefficients are obtained. ``"linear"`` (default): atoms from
            the SVD of the layer's filters and coefficients ``R·pinv(D0)``, never stored.
            ``"lasso"``: the paper's dictionary learning + FISTA sparse coding; the
            coefficients are a frozen buffer cached on disk.
        num_atoms: m, atoms per conv layer (k×k atoms for k×k convs, scalars for 1×1 convs).
            ``None`` means a complete basis (m = k²). A layer gets only as many as are degrees
            of freedom (linear coder: at most k²; 1×1 convs: one), see ``effective_atoms``.
        num_sub_atoms: m1, overcomplete sub-atoms per atom slot, rebuilt per input channel
            (0 = off).
        target_modules: conv layers that get filter atoms. A string is a regex that must
            fully match a module name; a list entry matches an exact name or a dotted suffix.
            ``None`` = every ``nn.Conv2d``. A matched ``nn.Linear`` gets channel atoms.
        channel_modules: Linear or 1×1 Conv2d layers that get channel atoms (same pattern rules;
            ``None`` = none).
        exclude_modules: names never adapted (checked first, same pattern rules).
        channel_block: k_c, side of the weight blocks that channel atoms act on.
        num_channel_atoms: m_c, channel atoms (k_c×k_c each) per layer (linear coder: at most
            k_c², the k_c²×k_c² block mix).
        lasso_lambda: L1 weight of the lasso coder (paper: 1e-3).
        lasso_iters: FISTA iterations of the final sparse-coding solve.
        dict_iters: dictionary-learning rounds of the lasso coder.
        seed: seed of the random initialisation of the overcomplete coefficients β.
    """

    coder: str = "linear"
    num_atoms: int | None = 9
    num_sub_atoms: int = 0
    target_modules: Patterns = None
    channel_modules: Patterns = None
    exclude_modules: Patterns = None
    channel_block: int = 4
    num_channel_atoms: int = 64
    lasso_lambda: float = 1e-3
    lasso_iters: int = 100
    dict_iters: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.coder not in CODERS:
            raise ConfigError(f"atoms.coder: {self.coder!r} is not one of {', '.join(CODERS)}")
        _check_int("num_atoms", self.num_atoms, 1, allow_none=True)
        _check_int("num_sub_atoms", self.num_sub_atoms, 0)
        _check_int("channel_block", self.channel_block, 1)
        _check_int("num_channel_atoms", self.num_channel_atoms, 1)
        _check_int("lasso_iters", self.lasso_iters, 1)
        _check_int("dict_iters", self.dict_iters, 0)
        _check_int("seed", self.seed, 0)
        if (
            isinstance(self.lasso_lambda, bool)
            or not isinstance(self.lasso_lambda, int | float)
            or not self.lasso_lambda >= 0
        ):
            raise ConfigError(
                f"atoms.lasso_lambda: must be a number >= 0, got {self.lasso_lambda!r}"
            )
        object.__setattr__(self, "lasso_lambda", float(self.lasso_lambda))
        for name in ("target_modules", "channel_modules", "exclude_modules"):
            object.__setattr__(self, name, _normalise_patterns(name, getattr(self, name)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AtomConfig:
        """Build from a mapping; a ``preset`` key starts from that preset.

        Unknown keys raise ConfigError naming the closest valid key.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"atoms: expected a mapping, got {type(data).__name__}")
        data = dict(data)
        base = cls()
        if "preset" in data:
            base = preset(data.pop("preset"))
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in valid:
                close = difflib.get_close_matches(str(key), valid + ["preset"], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"atoms.{key}: unknown key{hint}")
        return dataclasses.replace(base, **data)

    def to_dict(self) -> dict[str, Any]:
        """A JSON/YAML-friendly dict (tuples become lists) that ``from_dict`` accepts."""
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    @classmethod
    def from_yaml(cls, path: str | Path) -> AtomConfig:
        """Read a YAML mapping (``yaml.safe_load``) and build the config from it."""
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read atom config: {exc}") from None
        return cls.from_dict(data or {})


def _check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"atoms.{name}: must be an integer >= {minimum}, got {value!r}")


def _normalise_patterns(name: str, value: Any) -> Patterns:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as exc:
            raise ConfigError(f"atoms.{name}: invalid regex {value!r}: {exc}") from None
        return value
    if isinstance(value, Sequence | set | frozenset) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"atoms.{name}: expected a regex string or a list of names, got {value!r}")


ATTENTION_LINEARS = ("to_q", "to_k", "to_v", "to_out.0")

PRESETS: dict[str, AtomConfig] = {
    # Every Conv2d, linear coder, m = 9: the 9×9 tap mix of each 3×3 conv (81), one gain per
    # 1×1 conv (its 9 scalar atoms would act as one).
    "atoms": AtomConfig(),
    # The paper's exact setting: the lasso coder (dictionary learning + sparse codes, λ = 1e-3)
    # with m = 9 atoms per 3×3 conv; its α has full column rank, so all 81 are free.
    "atoms-paper": AtomConfig(coder="lasso"),
    # + overcomplete sub-atoms (m1 = 3) on all convs.
    "atoms-oc": AtomConfig(num_sub_atoms=3),
    # + channel atoms (k_c = 4) on the attention projections: the 16×16 block mix per layer.
    "atoms-attn": AtomConfig(channel_modules=ATTENTION_LINEARS),
}


def preset(name: str) -> AtomConfig:
    """Return the preset called ``name`` (ConfigError naming the valid ones otherwise)."""
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name), list(PRESETS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"atoms.preset: unknown preset {name!r} (valid: {', '.join(PRESETS)}){hint}"
        ) from None


def resolve_config(spec: AtomConfig | str | Mapping[str, Any] | None) -> AtomConfig:
    """Turn a config, a preset name, a dict or None (the ``atoms`` preset) into an AtomConfig."""
    if spec is None:
        return PRESETS["atoms"]
    if isinstance(spec, AtomConfig):
        return spec
    if isinstance(spec, str):
        return preset(spec)
    if isinstance(spec, Mapping):
        return AtomConfig.from_dict(spec)
    raise ConfigError(f"atoms: expected an AtomConfig, a preset name or a dict, got {spec!r}")
