"""--train-token: the token's embedding row is trained beside the method, saved in the
textual-inversion layout, written into the text encoders when a run is loaded, resumed exactly,
and exported beside LoRA files under the token's name."""

import shutil

import pytest
import torch
from safetensors.torch import load_file
from test_train import _config as train_config

from sdatom import token_embedding
from sdatom.config import TrainConfig
from sdatom.errors import ConfigError
from sdatom.export import export
from sdatom.families import family_of
from sdatom.runs import load_run_pipeline
from sdatom.train import train


def _config(tmp_path, name="run", **kw):
    """test_train's tiny run, training the token (both lrs high enough to move in 4 steps)."""
    return train_config(tmp_path, name, **{"lr": 1e-2, "train_token": True, "token_lr": 1e-2, **kw})


def _hidden(pipe, prompt):
    with torch.no_grad():
        return family_of(pipe).encode_prompts(pipe, [prompt], torch.device("cpu")).hidden


def test_the_trained_row_changes_only_prompts_with_the_token(tiny_pipe):
    before_with, before_without = _hidden(tiny_pipe, "a sks toy"), _hidden(tiny_pipe, "a toy")
    (vector,) = token_embedding.attach(tiny_pipe, "sks")
    # Attached, nothing changes yet: the vector starts as the token's own row.
    assert torch.equal(_hidden(tiny_pipe, "a sks toy"), before_with)
    with torch.no_grad():  # not a constant shift: the encoder's LayerNorms remove those
        vector.add_(torch.randn(vector.shape, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(_hidden(tiny_pipe, "a toy"), before_without)
    assert not torch.allclose(_hidden(tiny_pipe, "a sks toy"), before_with, atol=1e-3)
    # Gradients reach the vector and nothing else.
    ids = tiny_pipe.tokenizer(["a sks toy"], return_tensors="pt").input_ids
    tiny_pipe.text_encoder.requires_grad_(False)
    vector.requires_grad_(True)
    tiny_pipe.text_encoder(ids)[0].square().sum().backward()
    assert vector.grad is not None and vector.grad.abs().max() > 0
    assert tiny_pipe.text_encoder.get_input_embeddings().base.weight.grad is None


def test_a_token_of_several_pieces_is_refused(tiny_pipe):
    token = "zqxjvkw"
    assert len(tiny_pipe.tokenizer(token, add_special_tokens=False).input_ids) > 1
    with pytest.raises(ConfigError, match="--token 'zqxjvkw' is .* tokens"):
        token_embedding.token_ids(tiny_pipe, token)


def test_token_lr_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="token_lr: must be a positive number"):
        _config(tmp_path, token_lr=0.0)


def test_a_run_saves_the_token_and_loading_writes_it_into_the_text_encoder(tmp_path, tiny_pipe):
    result = train(_config(tmp_path), progress_bar=False)
    saved = load_file(result.output / token_embedding.EMBEDDING_FILE)
    width = tiny_pipe.text_encoder.get_input_embeddings().weight.shape[1]
    assert list(saved) == ["emb_params"] and saved["emb_params"].shape == (1, width)
    (sks,) = token_embedding.token_ids(tiny_pipe, "sks")
    initial = tiny_pipe.text_encoder.get_input_embeddings().weight[sks]
    assert (saved["emb_params"][0] - initial).abs().max() > 1e-3  # trained
    assert result.summary["train_token"] is True
    plain = train(_config(tmp_path, "plain", steps=1, train_token=False), progress_bar=False)
    assert result.trainable_params == plain.trainable_params + width

    pipe = load_run_pipeline(result.output)
    table = pipe.text_encoder.get_input_embeddings()
    assert isinstance(table, torch.nn.Embedding)  # merged: a plain table, no wrapper
    assert torch.equal(table.weight[sks], saved["emb_params"][0])
    # Every other row is the base model's.
    others = torch.ones(table.weight.shape[0], dtype=torch.bool)
    others[sks] = False
    base = tiny_pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(table.weight[others], base[others])


def test_a_finished_run_without_its_embedding_file_is_refused(tmp_path):
    from sdatom.errors import AdapterError

    result = train(_config(tmp_path, steps=1), progress_bar=False)
    (result.output / token_embedding.EMBEDDING_FILE).unlink()
    with pytest.raises(AdapterError, match="--train-token but has no token_embedding"):
        load_run_pipeline(result.output)


@pytest.mark.parametrize("vectors", [1, 3])
def test_resume_finishes_with_the_same_token_embedding(tmp_path, vectors):
    common = dict(steps=4, checkpoint_every=2, keep_checkpoints=3, prior=True)
    common |= dict(num_class_images=2, class_sample_steps=2, token_vectors=vectors)
    whole = train(_config(tmp_path, "whole", **common), progress_bar=False)
    cut = train(_config(tmp_path, "cut", **common), progress_bar=False)
    for name in ("adapter.safetensors", "train_summary.json", token_embedding.EMBEDDING_FILE):
        (cut.output / name).unlink()
    shutil.rmtree(cut.output / "checkpoints" / "step-000004")
    resumed = train(_config(tmp_path, "cut", **common), resume="latest", progress_bar=False)
    a = load_file(whole.output / token_embedding.EMBEDDING_FILE)["emb_params"]
    b = load_file(resumed.output / token_embedding.EMBEDDING_FILE)["emb_params"]
    assert torch.allclose(a, b, atol=1e-6, rtol=0), (a - b).abs().max()


def test_sdxl_trains_one_row_in_each_text_encoder(tmp_path):
    result = train(_config(tmp_path, model="tiny-sdxl", steps=2), progress_bar=False)
    saved = load_file(result.output / token_embedding.EMBEDDING_FILE)
    pipe = load_run_pipeline(result.output)
    widths = [e.get_input_embeddings().weight.shape[1] for e in family_of(pipe).text_encoders(pipe)]
    assert {k: tuple(v.shape) for k, v in saved.items()} == {
        "clip_l": (1, widths[0]),
        "clip_g": (1, widths[1]),
    }
    # diffusers' documented SDXL recipe (one load per text encoder) gives the run's hidden states.
    from sdatom.models import load_pipeline

    base = load_pipeline("tiny-sdxl")
    for key, encoder, tokenizer in (
        ("clip_l", base.text_encoder, base.tokenizer),
        ("clip_g", base.text_encoder_2, base.tokenizer_2),
    ):
        base.load_textual_inversion(
            saved[key], token="<sks>", text_encoder=encoder, tokenizer=tokenizer
        )
    got = family_of(base).encode_prompts(base, ["a <sks> toy"], torch.device("cpu"))
    want = family_of(pipe).encode_prompts(pipe, ["a sks toy"], torch.device("cpu"))
    assert torch.allclose(got.hidden, want.hidden, atol=1e-5, rtol=0)
    # (Not the pooled embedding: with the legacy eos_token_id = 2 of SDXL's CLIP configs,
    # transformers pools at the highest token id, which is then the added <sks>.)


def test_lora_export_writes_the_embedding_that_diffusers_loads(tmp_path, tiny_pipe):
    result = train(_config(tmp_path, steps=2), progress_bar=False)
    lines = []
    export(result.output, lora=tmp_path / "out" / "sks-toy.safetensors", echo=lines.append)
    written = tmp_path / "out" / "sks.safetensors"
    assert written.is_file() and any(line.startswith("token embedding:") for line in lines)
    # Under its own token, diffusers' loader gives the run's text conditioning.
    tiny_pipe.load_textual_inversion(str(written), token="<sks>")
    run_pipe = load_run_pipeline(result.output)
    assert torch.allclose(
        _hidden(tiny_pipe, "a <sks> toy"), _hidden(run_pipe, "a sks toy"), atol=1e-5, rtol=0
    )
    # The file is not overwritten by a second export into the same folder.
    from sdatom.errors import UsageError

    with pytest.raises(UsageError, match="sks.safetensors already exists"):
        export(result.output, diff=tmp_path / "out" / "diff.safetensors")


def _two_process_worker(cfg_dict):
    from accelerate import PartialState

    PartialState._reset_state()  # forked from a process that already ran single-process runs
    train(TrainConfig.from_dict(cfg_dict), progress_bar=False)


@pytest.mark.slow
def test_two_processes_average_the_token_gradient(tmp_path):
    """The text encoders are outside DDP: without the explicit average, the saved vector
    would follow process 0's rows only."""
    from accelerate import debug_launcher

    one = train(_config(tmp_path, "one", steps=2, batch_size=2), progress_bar=False)
    two = _config(tmp_path, "two", steps=2, batch_size=1).to_dict()
    debug_launcher(_two_process_worker, args=(two,), num_processes=2)
    a = load_file(one.output / token_embedding.EMBEDDING_FILE)["emb_params"]
    b = load_file(tmp_path / "two" / token_embedding.EMBEDDING_FILE)["emb_params"]
    assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()


def test_the_exact_diff_export_of_a_token_run_samples_like_the_run(tmp_path):
    """The export's sample check loads the embedding too: with the exact update, the images
    match (without the embedding they would differ wherever the prompt says sks)."""
    from sdatom.lorafile import export_diff

    result = train(_config(tmp_path, steps=2, token_lr=0.5), progress_bar=False)
    report = export_diff(result.output, tmp_path / "out" / "d.safetensors", dtype="fp32")
    assert report.image_diff["mean_abs"] <= 1e-3 and report.image_diff["max_abs"] <= 1e-2


def test_push_to_hub_uploads_the_embedding_with_the_file(tmp_path):
    from sdatom.card import HubError

    result = train(_config(tmp_path, steps=1), progress_bar=False)
    out = tmp_path / "out" / "d.safetensors"
    # Offline here: the one-line error lists every file the upload would have taken.
    with pytest.raises(HubError, match=r"sks\.safetensors"):
        export(result.output, diff=out, samples=0, push_to_hub="me/dog")


def test_a_multi_vector_token_gives_each_copy_its_own_vector(tiny_pipe):
    assert token_embedding.expand("a sks toy, sks!", "sks", 3) == "a sks sks sks toy, sks sks sks!"
    assert token_embedding.expand("asks a sks", "sks", 2) == "asks a sks sks"  # whole words
    assert token_embedding.expand("a sks toy", "sks", 1) == "a sks toy"
    (vectors,) = token_embedding.attach(tiny_pipe, "sks", 3)
    assert vectors.shape == (3, tiny_pipe.text_encoder.get_input_embeddings().weight.shape[1])
    with torch.no_grad():
        vectors.copy_(torch.randn(vectors.shape, generator=torch.Generator().manual_seed(0)))
    ids = tiny_pipe.tokenizer("a sks sks sks toy", return_tensors="pt").input_ids
    (sks,) = token_embedding.token_ids(tiny_pipe, "sks")
    at = (ids[0] == sks).nonzero()[:, 0]
    rows = tiny_pipe.text_encoder.get_input_embeddings()(ids)[0, at]
    assert torch.equal(rows, vectors)  # copy k takes vector k


def _training_conditioning(model, saved, prompt):
    """The conditioning training saw: the base model, the vectors attached, the prompt expanded."""
    from sdatom.models import load_pipeline

    pipe = load_pipeline(model)
    token_embedding.attach(pipe, "sks", next(iter(saved.values())).shape[0])
    token_embedding.load_state_dict(pipe, saved)
    with torch.no_grad():
        n = next(iter(saved.values())).shape[0]
        return family_of(pipe).encode_prompts(
            pipe, [token_embedding.expand(prompt, "sks", n)], torch.device("cpu")
        )


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_a_multi_vector_run_loads_with_the_conditioning_it_trained_on(tmp_path, model):
    result = train(_config(tmp_path, model=model, steps=2, token_vectors=3), progress_bar=False)
    saved = load_file(result.output / token_embedding.EMBEDDING_FILE)
    assert {tuple(v.shape)[0] for v in saved.values()} == {3}
    assert result.summary["token_vectors"] == 3
    pipe = load_run_pipeline(result.output)
    # diffusers' multi-vector loading: the pipeline expands the token in every prompt.
    assert pipe.maybe_convert_prompt("a sks toy", pipe.tokenizer) == "a sks sks_1 sks_2 toy"
    with torch.no_grad():
        got = family_of(pipe).encode_prompts(pipe, ["a sks toy"], torch.device("cpu"))
    want = _training_conditioning(model, saved, "a sks toy")
    assert torch.allclose(got.hidden, want.hidden, atol=1e-5, rtol=0)
    if model == "tiny-sdxl":  # pooled at the end-of-text token, not at the added tokens
        assert torch.allclose(got.pooled, want.pooled, atol=1e-5, rtol=0)
    # Loading the vectors again (a checkpoint's) rewrites the rows instead of failing.
    token_embedding.write_into(pipe, {k: v * 2 for k, v in saved.items()}, "sks")
    with torch.no_grad():
        again = family_of(pipe).encode_prompts(pipe, ["a sks toy"], torch.device("cpu"))
    twice = _training_conditioning(model, {k: v * 2 for k, v in saved.items()}, "a sks toy")
    assert torch.allclose(again.hidden, twice.hidden, atol=1e-5, rtol=0)


def test_a_multi_vector_run_exports_for_diffusers_and_beside_a_lora(tmp_path, tiny_pipe):
    from diffusers import StableDiffusionPipeline

    from sdatom.errors import UsageError

    result = train(_config(tmp_path, steps=2, token_vectors=3), progress_bar=False)
    want = _hidden(load_run_pipeline(result.output), "a sks toy")
    # A merged folder: plain diffusers, the user's prompt unchanged.
    export(result.output, merged=tmp_path / "merged", samples=0)
    plain = StableDiffusionPipeline.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        ids = plain.tokenizer(
            plain.maybe_convert_prompt("a sks toy", plain.tokenizer),
            padding="max_length",
            max_length=plain.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids
        assert torch.allclose(plain.text_encoder(ids)[0], want, atol=1e-5, rtol=0)
    # Beside a LoRA: the (3, width) file diffusers, A1111 and ComfyUI read as multi-vector.
    export(result.output, lora=tmp_path / "out" / "l.safetensors", samples=0)
    tiny_pipe.load_textual_inversion(str(tmp_path / "out" / "sks.safetensors"), token="<sks>")
    assert torch.allclose(_hidden(tiny_pipe, "a <sks> toy"), want, atol=1e-5, rtol=0)
    with pytest.raises(UsageError, match="3-vector token.*single-file"):
        export(result.output, single_file=tmp_path / "one.safetensors")
