from hypothesis import HealthCheck, settings

# Timing varies on shared CI machines; correctness, not speed, is what these tests check
# (speed is measured in bench/).
settings.register_profile("default", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("default")
