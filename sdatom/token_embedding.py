"""The placeholder token's own input embedding, trained beside the method (``--train-token``).

DreamBooth binds a subject to a rare token through the UNet alone. When the text encoder turns
that token into almost nothing, there is nothing for the UNet to bind to: in the toy model,
``a photo of sks square`` and ``a photo of a square`` are 4.0 apart in the hidden states (summed
over the 77 positions; 0.4 at the token, norm 7.8), two prompts that differ in a colour word
150-170 (``scripts/probe_toy.py text``). ``--train-token`` also trains the token's
row of each text encoder's input embedding: textual inversion alongside the adapter, what
kohya's and diffusers' "pivotal tuning" do. The trained rows are written into the embedding
tables when a run is loaded (sampling costs nothing extra) and are saved in the
textual-inversion layout A1111, ComfyUI and diffusers' ``load_textual_inversion`` read:
``emb_params`` for one text encoder, ``clip_l`` / ``clip_g`` for SDXL's two
(:attr:`sdatom.families.Family.embedding_keys`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from sdatom.errors import AdapterError, ConfigError, first_line
from sdatom.fileio import atomic_path

EMBEDDING_FILE = "token_embedding.safetensors"
#: Key prefix of the token's vectors among a checkpoint's trainable tensors.
CHECKPOINT_PREFIX = "token_embedding."


class TrainedTokenEmbedding(torch.nn.Module):
    """A text encoder's input embedding whose row for one token is a trainable vector."""

    def __init__(self, base: torch.nn.Embedding, token_id: int):
        super().__init__()
        self.base, self.token_id = base, token_id
        # fp32 like every trainable parameter; the frozen table may be in the compute dtype.
        self.vector = torch.nn.Parameter(base.weight[token_id].detach().float().clone())

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)
        hit = (input_ids == self.token_id).unsqueeze(-1)
        return torch.where(hit, self.vector.to(out.dtype), out)


def token_ids(pipe: Any, token: str) -> list[int]:
    """The token's id in each of the pipeline's tokenizers (ConfigError unless it is one token)."""
    from sdatom.families import family_of

    ids = []
    for tokenizer in family_of(pipe).tokenizers(pipe):
        pieces = tokenizer(token, add_special_tokens=False).input_ids
        if len(pieces) != 1:
            raise ConfigError(
                f"--token {token!r} is {len(pieces)} tokens to the tokenizer; --train-token "
                "trains one token's embedding: pick a single-token word such as sks"
            )
        ids.append(pieces[0])
    return ids


def attach(pipe: Any, token: str) -> list[torch.nn.Parameter]:
    """Make the token's embedding row trainable in every text encoder; return the vectors."""
    from sdatom.families import family_of

    vectors = []
    for encoder, token_id in zip(
        family_of(pipe).text_encoders(pipe), token_ids(pipe, token), strict=True
    ):
        wrapper = TrainedTokenEmbedding(encoder.get_input_embeddings(), token_id)
        encoder.set_input_embeddings(wrapper)
        vectors.append(wrapper.vector)
    return vectors


def _wrappers(pipe: Any) -> list[TrainedTokenEmbedding]:
    from sdatom.families import family_of

    found = [e.get_input_embeddings() for e in family_of(pipe).text_encoders(pipe)]
    if not all(isinstance(w, TrainedTokenEmbedding) for w in found):
        raise RuntimeError("the token embedding is not attached (call attach first)")
    return found


def state_dict(pipe: Any) -> dict[str, torch.Tensor]:
    """The trained vectors under the family's textual-inversion keys, each ``(1, width)``."""
    from sdatom.families import family_of

    keys = family_of(pipe).embedding_keys
    return {k: w.vector.detach().float()[None] for k, w in zip(keys, _wrappers(pipe), strict=True)}


def load_state_dict(pipe: Any, state: dict[str, torch.Tensor]) -> None:
    """Put saved vectors back into the attached trainable rows (a resumed run)."""
    from sdatom.families import family_of

    with torch.no_grad():
        for key, wrapper in zip(family_of(pipe).embedding_keys, _wrappers(pipe), strict=True):
            wrapper.vector.copy_(state[key][0])


def checkpoint_state(pipe: Any) -> dict[str, torch.Tensor]:
    """The vectors as a checkpoint stores them, beside the method's tensors (prefixed)."""
    return {CHECKPOINT_PREFIX + k: v for k, v in state_dict(pipe).items()}


def split_checkpoint(
    trainable: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A checkpoint's tensors: the method's, and the token's (prefix removed; empty without)."""
    n = len(CHECKPOINT_PREFIX)
    token = {k[n:]: v for k, v in trainable.items() if k.startswith(CHECKPOINT_PREFIX)}
    return {k: v for k, v in trainable.items() if not k.startswith(CHECKPOINT_PREFIX)}, token


def save(pipe: Any, path: Path, token: str) -> Path:
    """Write the trained vectors as a textual-inversion file (atomically)."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in state_dict(pipe).items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "token": token})
    return path


def read(path: str | os.PathLike, pipe: Any) -> dict[str, torch.Tensor]:
    """A textual-inversion file's vectors, checked against the pipeline's text encoders."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from sdatom.families import family_of

    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise AdapterError(f"{path}: not a readable token embedding ({first_line(e)})") from None
    family = family_of(pipe)
    encoders = family.text_encoders(pipe)
    for key, encoder in zip(family.embedding_keys, encoders, strict=True):
        width = encoder.get_input_embeddings().weight.shape[1]
        if key not in state or tuple(state[key].shape) != (1, width):
            raise AdapterError(
                f"{path}: needs {key!r} of shape (1, {width}) for this {family.label} model, "
                f"has { ({k: tuple(v.shape) for k, v in state.items()}) }: it was trained on "
                "another base model"
            )
    return state


def write_into(pipe: Any, state: dict[str, torch.Tensor], token: str) -> None:
    """Write a trained token's vectors (:func:`read`) into the embedding tables (no wrapper)."""
    from sdatom.families import family_of

    family = family_of(pipe)
    ids = token_ids(pipe, token)
    with torch.no_grad():
        for key, encoder, token_id in zip(
            family.embedding_keys, family.text_encoders(pipe), ids, strict=True
        ):
            table = encoder.get_input_embeddings().weight
            table[token_id] = state[key][0].to(table.dtype)


def load_into(pipe: Any, run_dir: Path, token: str) -> None:
    """Write a ``--train-token`` run's embedding (``run_dir / EMBEDDING_FILE``) into ``pipe``."""
    path = run_dir / EMBEDDING_FILE
    if not path.is_file():
        raise AdapterError(
            f"{run_dir} was trained with --train-token but has no {EMBEDDING_FILE}: the run "
            "did not finish; continue it with `sdatom train ... --resume latest`"
        )
    write_into(pipe, read(path, pipe), token)
