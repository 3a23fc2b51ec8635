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
    """A text encoder's input embedding whose row for one token is trainable: ``n`` vectors.

    With ``n > 1`` (``--token-vectors``) prompts carry the token ``n`` times in a row
    (:func:`expand`) and the k-th copy of a run takes the k-th vector, as textual inversion's
    multi-vector tokens do; with ``n = 1`` it is the token's own row.
    """

    def __init__(self, base: torch.nn.Embedding, token_id: int, n: int = 1):
        super().__init__()
        self.base, self.token_id = base, token_id
        # fp32 like every trainable parameter; the frozen table may be in the compute dtype.
        # Every vector starts as the token's row: the copies differ by position from the start.
        row = base.weight[token_id].detach().float()
        self.vectors = torch.nn.Parameter(row[None].repeat(n, 1))

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)
        hit = input_ids == self.token_id
        # The k-th occurrence of the token along the prompt takes vector k mod n: with every
        # occurrence expanded to n copies, each copy its own vector.
        k = (hit.long().cumsum(-1) - 1).clamp(min=0) % self.vectors.shape[0]
        return torch.where(hit.unsqueeze(-1), self.vectors.to(out.dtype)[k], out)


def expand(prompt: str, token: str, n: int) -> str:
    """``prompt`` with each whole-word ``token`` written ``n`` times (``--token-vectors``)."""
    from sdatom.prompts import token_pattern

    return prompt if n == 1 else token_pattern(token).sub(" ".join([token] * n), prompt)


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


def attach(pipe: Any, token: str, n: int = 1) -> list[torch.nn.Parameter]:
    """Make the token's embedding row trainable in every text encoder (``n`` vectors each);
    return the parameters, one ``(n, width)`` per text encoder."""
    from sdatom.families import family_of

    vectors = []
    for encoder, token_id in zip(
        family_of(pipe).text_encoders(pipe), token_ids(pipe, token), strict=True
    ):
        wrapper = TrainedTokenEmbedding(encoder.get_input_embeddings(), token_id, n)
        encoder.set_input_embeddings(wrapper)
        vectors.append(wrapper.vectors)
    return vectors


def _wrappers(pipe: Any) -> list[TrainedTokenEmbedding]:
    from sdatom.families import family_of

    found = [e.get_input_embeddings() for e in family_of(pipe).text_encoders(pipe)]
    if not all(isinstance(w, TrainedTokenEmbedding) for w in found):
        raise RuntimeError("the token embedding is not attached (call attach first)")
    return found


def state_dict(pipe: Any) -> dict[str, torch.Tensor]:
    """The trained vectors under the family's textual-inversion keys, each ``(n, width)``."""
    from sdatom.families import family_of

    keys = family_of(pipe).embedding_keys
    return {k: w.vectors.detach().float() for k, w in zip(keys, _wrappers(pipe), strict=True)}


def load_state_dict(pipe: Any, state: dict[str, torch.Tensor]) -> None:
    """Put saved vectors back into the attached trainable rows (a resumed run)."""
    from sdatom.families import family_of

    with torch.no_grad():
        for key, wrapper in zip(family_of(pipe).embedding_keys, _wrappers(pipe), strict=True):
            wrapper.vectors.copy_(state[key])


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
    rows = {tuple(v.shape)[0] for v in state.values() if v.ndim == 2}
    for key, encoder in zip(family.embedding_keys, encoders, strict=True):
        width = encoder.get_input_embeddings().weight.shape[1]
        shape = tuple(state[key].shape) if key in state else None
        if shape is None or len(shape) != 2 or shape[1] != width or shape[0] < 1 or len(rows) > 1:
            raise AdapterError(
                f"{path}: needs {key!r} of shape (n, {width}) for this {family.label} model, "
                f"has { ({k: tuple(v.shape) for k, v in state.items()}) }: it was trained on "
                "another base model"
            )
    return state


def write_into(pipe: Any, state: dict[str, torch.Tensor], token: str) -> None:
    """Write a trained token's vectors (:func:`read`) into the text encoders (no wrapper).

    One vector goes into the token's own row. Several (``--token-vectors``) cannot: they are
    loaded as diffusers loads a multi-vector textual inversion, as new tokenizer entries
    ``token``, ``token_1``, ... that the pipeline expands ``token`` into in every prompt
    (``maybe_convert_prompt``), so ``a sks dog`` works unchanged.
    """
    from sdatom.families import family_of

    family = family_of(pipe)
    ids = token_ids(pipe, token)
    encoders, tokenizers = family.text_encoders(pipe), family.tokenizers(pipe)
    with torch.no_grad():
        for key, encoder, tokenizer, token_id in zip(
            family.embedding_keys, encoders, tokenizers, ids, strict=True
        ):
            vectors = state[key]
            if vectors.shape[0] == 1:
                table = encoder.get_input_embeddings().weight
                table[token_id] = vectors[0].to(table.dtype)
                continue
            names = [token] + [f"{token}_{i}" for i in range(1, vectors.shape[0])]
            if all(n in tokenizer.added_tokens_encoder for n in names):  # loaded before: rewrite
                table = encoder.get_input_embeddings().weight
                table[tokenizer.convert_tokens_to_ids(names)] = vectors.to(table.dtype)
                continue
            pipe.load_textual_inversion(
                vectors, token=token, tokenizer=tokenizer, text_encoder=encoder
            )
            # CLIP configs with the legacy eos_token_id 2 pool at the highest token id, which
            # is now an added token: pool at the end-of-text token instead (where the legacy
            # rule pooled before, as every id was below it), as training did.
            if encoder.config.eos_token_id != tokenizer.eos_token_id:
                encoder.config.eos_token_id = tokenizer.eos_token_id
                for module in encoder.modules():  # the text transformer keeps its own copy
                    if "eos_token_id" in vars(module):
                        module.eos_token_id = tokenizer.eos_token_id


def load_into(pipe: Any, run_dir: Path, token: str) -> None:
    """Write a ``--train-token`` run's embedding (``run_dir / EMBEDDING_FILE``) into ``pipe``."""
    path = run_dir / EMBEDDING_FILE
    if not path.is_file():
        raise AdapterError(
            f"{run_dir} was trained with --train-token but has no {EMBEDDING_FILE}: the run "
            "did not finish; continue it with `sdatom train ... --resume latest`"
        )
    write_into(pipe, read(path, pipe), token)
