"""Reading `ovsflow collect`'s output while a test runs: a collector whose stdout pipe is
not read stops reading its socket when the pipe is full, and then the agent stalls too."""

from __future__ import annotations

import json
import threading


class Output:
    """Every line the collector prints, read in a thread from the start."""

    def __init__(self, collector):
        self.collector, self.lines = collector, []
        self._reader = threading.Thread(target=lambda: self.lines.extend(
            collector.process.stdout))
        self._reader.start()

    def records(self, options: bool = False) -> list[dict]:
        """The flow records printed so far (with `options`, the options records)."""
        lines = [json.loads(line) for line in list(self.lines)]
        return [line for line in lines if line.get("_options", False) == options]

    def until_disconnected(self) -> list[dict]:
        """Every record, once the collector has read an exporter's connection to its end (it
        says so on stderr after printing every record of it); then the collector is
        stopped. Its --timeout bounds the wait."""
        process = self.collector.process
        try:
            while line := process.stderr.readline():
                if "disconnected" in line:
                    break
            else:
                raise AssertionError("the collector never saw the end of the connection")
        finally:
            self.stop()
        return self.records()

    def stop(self) -> None:
        process = self.collector.process
        if process.poll() is None:
            process.terminate()
        self._reader.join(timeout=60)
        process.wait(timeout=30)
