"""What `ovsflow conntrack --count` imports. It is timed as a whole process against
`conntrack -L` (bench/bench_poll.py 1b), where the interpreter's start and imports are a
good part of the figure: a module that only another command or another code path needs is
imported where it is used, and this test keeps it so. Needs root (a network namespace)."""

from __future__ import annotations

import pytest

from helpers import filled_namespace
from lab.netns import PYTHON

# Each is loaded only by what needs it: ssl by a TLS collector's files (config, transport),
# difflib by a misspelt key's hint (config), numpy by the filter's columns and the store,
# asyncio and the rest by the agent.
NOT_ON_THE_COUNT_PATH = ("ssl", "difflib", "numpy", "asyncio", "pyroute2", "ovs",
                         "prometheus_client", "tenacity", "ovsflow.agent", "ovsflow.store",
                         "ovsflow.exporter", "ovsflow.transport")

# The command as the console script runs it, then the modules it left loaded.
COUNT_AND_LIST_MODULES = """
import sys
from ovsflow.cli import main
status = main(sys.argv[1:])
print(status, *sorted(sys.modules))
"""


@pytest.mark.parametrize("kept", [False, True], ids=["probing", "probe-answer-kept"])
def test_conntrack_count_imports_only_what_it_uses(tmp_path, kept):
    config = tmp_path / "ovsflow.yaml"
    config.write_text("conntrack:\n  source: kernel\n  zones: [65520]\novs:\n  bridge: ''\n"
                      f"state:\n  directory: '{tmp_path / 'state'}'\n")
    with filled_namespace("imports", 3) as ns:
        command = (PYTHON, "-c", COUNT_AND_LIST_MODULES, "conntrack", "--config", str(config),
                   "--count")
        if kept:  # the first run probes the kernel's dump filters and keeps the answer
            ns.run(*command)
            assert list((tmp_path / "state").iterdir())
        count, listing = ns.run(*command).stdout.splitlines()
    status, *modules = listing.split()
    assert (count, status) == ("3", "0")
    assert {"yaml", "ovsflow.config", "ovsflow.source.kernel"} <= set(modules)
    assert sorted(set(NOT_ON_THE_COUNT_PATH) & set(modules)) == []
    if kept:  # random only picks the probe entry's port
        assert "random" not in modules
