from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory) -> Path:
    """A tiny random-weight Qwen2-VL (transformers and vLLM), built once per test session."""
    from alignkit.models import build_tiny_qwen2_vl

    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("models") / "tiny-qwen2-vl")


@pytest.fixture(scope="session")
def family_models(tmp_path_factory) -> Path:
    """A cache directory of tiny models of any family (`tiny_model(name, cache_dir=...)`), each built on first use."""
    return tmp_path_factory.mktemp("family-models")
