"""Lines that repeat are logged once a minute each, with what was not shown (logs.py). The
lines are a real exporter's, against a collector port where nothing listens; an hour of
polls goes by on the filter's own clock (a stand-in for waiting an hour)."""

import asyncio
import logging
import subprocess

from helpers import OVSFLOW, free_port
from ovsflow.exporter import Exporter
from ovsflow.logs import RepeatFilter
from ovsflow.transport import StreamTransport
from test_exporter import records


class Lines(logging.Handler):
    def __init__(self, clock):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.addFilter(RepeatFilter(clock=clock))

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_an_hour_of_drops_is_sixty_lines_with_running_totals():
    """A poll every 5 s while the collector is away, each dropping the records over the
    queue's bound: 720 drop lines an hour without the filter."""
    now = [0.0]
    handler = Lines(lambda: now[0])
    root = logging.getLogger()
    root.addHandler(handler)
    previous_level = root.level
    root.setLevel(logging.INFO)

    async def outage():
        exporter = Exporter(StreamTransport("127.0.0.1", free_port()), 1, max_buffered=10,
                            max_backoff=0.2)
        exporter.start()
        exporter.submit(records(0, 15))
        await exporter.wait_for_room()  # the first attempt fails: unreachable from here on
        for poll in range(720):
            now[0] = 5.0 * poll
            exporter.submit(records(15 + 10 * poll, 10))  # over the bound: 10 dropped
            await asyncio.sleep(0)
        await exporter.close(0.1)
        return exporter.stats.records_dropped

    try:
        dropped = asyncio.run(outage())
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)
    drops = [line for line in handler.lines if "oldest records" in line]
    assert dropped >= 7205
    assert len(drops) == 60, len(drops)  # one a minute
    assert drops[0].endswith("dropped the 5 oldest records (5 dropped so far)")
    # the polls of the first minute (0 s to 55 s) held, the one at 60 s shown with them
    assert drops[1].endswith("dropped the 10 oldest records (135 dropped so far) [12 more "
                             "like this in the last 60s not shown]")
    assert drops[-1].endswith("(7095 dropped so far) [11 more like this in the last 60s not "
                              "shown]")


def test_lines_with_other_words_and_quieter_lines_pass():
    now = [0.0]
    handler = Lines(lambda: now[0])
    log = logging.getLogger("ovsflow.test_logs")
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO)
    try:
        for second in range(10):
            now[0] = float(second)
            log.warning("collector %s unreachable", "a:4739")
            log.warning("collector %s unreachable", "b:4739")
            log.info("connected to the collector %s", "a:4739")
            log.warning("a line without arguments")
        now[0] = 61.0
        log.warning("collector %s unreachable", "a:4739")
        for error in ("no such file", "not a certificate"):  # other words: both shown
            log.error("reload: %s: %s; keeping the running configuration", "f.yaml", error)
    finally:
        log.removeHandler(handler)
    assert handler.lines.count("collector a:4739 unreachable") == 1
    assert handler.lines.count("collector b:4739 unreachable") == 1
    assert handler.lines.count("connected to the collector a:4739") == 10
    assert handler.lines.count("a line without arguments") == 1
    assert handler.lines[-3] == ("collector a:4739 unreachable [9 more like this in the last "
                                 "61s not shown]")
    assert handler.lines[-2:] == [
        "reload: f.yaml: no such file; keeping the running configuration",
        "reload: f.yaml: not a certificate; keeping the running configuration"]


def test_the_commands_log_through_the_filter():
    """Every command logs through it (the handler `ovsflow` sets up)."""
    script = ("import logging; from ovsflow.cli import setup_logging; "
              "setup_logging('info', 'text'); "
              "print([type(f).__name__ for h in logging.getLogger().handlers "
              "for f in h.filters])")
    python = OVSFLOW.rsplit("/", 1)[0] + "/python"
    out = subprocess.run([python, "-c", script], capture_output=True, text=True,
                         check=True).stdout
    assert "RepeatFilter" in out
