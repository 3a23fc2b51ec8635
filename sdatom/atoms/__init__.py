"""Filter atoms: decompose conv weights into atoms × coefficients and tune only the atoms.

Independent of diffusers: works on any torch module. See ``add_atoms`` to start.
"""

from sdatom.atoms.config import PRESETS, AtomConfig, preset, resolve_config
from sdatom.atoms.inject import (
    add_atoms,
    count_trainable,
    disable_atoms,
    find_targets,
    fit_report,
    merge_atoms,
    remove_atoms,
    set_atoms_enabled,
    trainable_parameters,
    unmerge_atoms,
)
from sdatom.atoms.io import (
    atom_state_dict,
    load_atom_state_dict,
    load_atoms,
    read_atoms_metadata,
    save_atoms,
)
from sdatom.atoms.layer import AtomConv2d, AtomLayer, AtomLinear

__all__ = [
    "PRESETS",
    "AtomConfig",
    "AtomConv2d",
    "AtomLayer",
    "AtomLinear",
    "add_atoms",
    "atom_state_dict",
    "count_trainable",
    "disable_atoms",
    "find_targets",
    "fit_report",
    "load_atom_state_dict",
    "load_atoms",
    "merge_atoms",
    "preset",
    "read_atoms_metadata",
    "remove_atoms",
    "resolve_config",
    "save_atoms",
    "set_atoms_enabled",
    "trainable_parameters",
    "unmerge_atoms",
]
