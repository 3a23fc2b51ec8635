"""Shared fixtures: offline, one torch thread, a private model cache, the tiny pipeline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def sdatom_cache(tmp_path_factory):
    """Built models and caches go to a folder of this test session, not the user's cache."""
    if "SDATOM_TEST_CACHE" in os.environ:  # reuse across runs when a developer asks for it
        os.environ["SDATOM_CACHE"] = os.environ["SDATOM_TEST_CACHE"]
    else:
        os.environ["SDATOM_CACHE"] = str(tmp_path_factory.mktemp("sdatom-cache"))
    return os.environ["SDATOM_CACHE"]


@pytest.fixture(scope="session")
def tiny_dir(sdatom_cache):
    """The folder of the built ``tiny`` pipeline (built once per session)."""
    from sdatom.models import built_pipeline_dir

    return built_pipeline_dir("tiny")


@pytest.fixture
def tiny_pipe(tiny_dir):
    """A fresh ``tiny`` pipeline on the CPU in float32."""
    from sdatom.models import load_pipeline

    return load_pipeline(str(tiny_dir))
