import os

from hypothesis import HealthCheck, settings

# Timing varies on shared CI machines; correctness, not speed, is what these tests check
# (speed is measured in bench/). The fuzz profile (scripts/fuzz) runs the parsers' fuzz
# tests, marked `fuzz`, with 100k generated inputs each; CI runs a sample.
settings.register_profile("default", deadline=None, max_examples=300,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", deadline=None, max_examples=100_000,
                          suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_configure(config):
    config.addinivalue_line("markers", "fuzz: a parser fuzz test (scripts/fuzz runs 100k each)")
