import torch


def pytest_configure(config):
    # Each benchmark compiles torch.compile(reference) once; allow enough cache entries for all
    # shapes of the session instead of silently falling back to eager.
    torch._dynamo.config.cache_size_limit = 64
