"""pytest-benchmark setup: `--device cpu|cuda` (default: cuda when present)."""
import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--device", default=None, help="cpu or cuda (default: cuda if available)")


@pytest.fixture(scope="session")
def device(request):
    d = request.config.getoption("--device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if d == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device(d)
