import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("CRATE_ALPHA_FIXTURES", REPO.parent / "shared" / "fixtures"))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.fixture(scope="session")
def fixtures() -> Path:
    assert FIXTURES.is_dir(), f"reference fixtures not found at {FIXTURES} (set CRATE_ALPHA_FIXTURES)"
    return FIXTURES


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """The digits demo corpus, built once per test session through the real downloader."""
    from crate_alpha.data.digits import build_demo

    out = tmp_path_factory.mktemp("demo") / "data"
    info = build_demo(out)
    return out, info


@pytest.fixture
def no_model_build(monkeypatch):
    """Fails a test whose command builds a model before it has checked its input."""
    import open_clip
    import timm

    def refuse(*a, **k):
        raise AssertionError("a model was built before the input was checked")

    for module, name in ((open_clip, "create_model"), (open_clip, "create_model_and_transforms"),
                         (timm, "create_model")):
        monkeypatch.setattr(module, name, refuse)
