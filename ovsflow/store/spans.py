"""Spans: what a connection's records say beyond numbers, encoded once per distinct value.

A record's run of variable-length fields between the fixed ones (Pod, namespace and node
names, rule names and actions, TCP state) is its *span*. It is encoded once per distinct
(Pods, labels, state), kept by id, and each connection holds the id of its own
(`ConnectionTable.span`) until its state or labels change (the poll's comparison sets the
id to 0) or the Pod map changes and its Pods with it. The Pods at a connection's two ends
are looked up when it is first seen (`first_pods`): a Pod that takes over an address later
is not credited with it.
"""

from __future__ import annotations

import numpy as np

from ..connection import IDENTITY_SIZE
from ..enrich import FLOW_TYPE_UNKNOWN, NO_PODS, Enricher, flow_type
from ..ipfix.templates import RECORD_TEMPLATES, pick
from ..polled import NO_LABELS, STATE_NAMES, labels_differ
from ..record import CONNTRACK, CONNTRACK_UNCOUNTED, FlowRecord
from .table import ConnectionTable

# The four conntrack templates share their run of strings: one encoded span serves them all.
_SPAN = RECORD_TEMPLATES[CONNTRACK, False]
assert all(RECORD_TEMPLATES[kind, ipv6].span.fields == _SPAN.span.fields
           for kind in (CONNTRACK, CONNTRACK_UNCOUNTED) for ipv6 in (False, True))
MAX_SPANS = 65536  # distinct encoded spans kept; past this they are made again as needed


class Spans:
    def __init__(self, table: ConnectionTable, enricher: Enricher | None):
        self.table = table
        self.enricher = enricher  # Pods, flowType, rule ids; None: addresses only
        self.encoded: list[bytes] = [b""]  # by id; 0: none found yet
        self.lengths = np.zeros(1024, "u4")  # of `encoded`, by id: a gather per batch
        self._ids: dict[tuple, int] = {}
        # One object per distinct pair of Pods, however many connections hold it. Cleared
        # with the spans.
        self._values: dict = {}
        self._settings = 0  # the enricher's, when the spans were found

    def first_pods(self, slots: np.ndarray) -> None:
        """The Pods at the two ends of the connections just filled into `slots`."""
        enricher, pods = self.enricher, self.table.pods
        if enricher is None or not enricher.has_pod_map:
            return  # no slot ever holds Pods
        if not enricher.knows_pods:
            for slot in slots.tolist():
                pods[slot] = NO_PODS
            return
        keys, shared = self.table.keys, self._shared
        for slot in slots.tolist():
            key = keys[slot]
            length = (len(key) - IDENTITY_SIZE) >> 1
            pods[slot] = shared(enricher.pods(key[IDENTITY_SIZE:IDENTITY_SIZE + length],
                                              key[IDENTITY_SIZE + length:]))

    def _shared(self, value):
        return self._values.setdefault(value, value)

    def find(self, slots: np.ndarray) -> None:
        """The span (and flowType) of the connections in `slots` whose state or labels
        changed, or whose Pods may have, since it was last found."""
        enricher, table = self.enricher, self.table
        generation, settings = (enricher.generation, enricher.settings) if enricher else (0, 0)
        if (len(self.encoded) > MAX_SPANS or len(self._values) > MAX_SPANS
                or settings != self._settings):
            self.encoded, self._ids, self._values = [b""], {}, {}
            self.lengths = np.zeros(1024, "u4")
            self._settings = settings
            np.asarray(table.span)[:table.used] = 0
        stale = slots[(np.asarray(table.span)[slots] == 0)
                      | (np.asarray(table.span_generation)[slots] != generation)]
        if not len(stale):
            return
        keys, known, span, span_generation = table.keys, table.pods, table.span, \
            table.span_generation
        if enricher is None or not enricher.knows_pods:
            # None found now; none kept either without a Pod map, or when all are NO_PODS
            if (enricher is None or not enricher.has_pod_map
                    or pick(known, stale.tolist()).count(NO_PODS) == len(stale)):
                self._find_without_pods(stale, generation)
                return
        labels = [b"" if value == NO_LABELS else value
                  for value in table.labels[stale].tolist()]
        for slot, code, label in zip(stale.tolist(), np.asarray(table.states)[stale].tolist(),
                                     labels):
            key = keys[slot]
            pods = NO_PODS
            if enricher is not None:
                length = (len(key) - IDENTITY_SIZE) >> 1
                source = key[IDENTITY_SIZE:IDENTITY_SIZE + length]
                destination = key[IDENTITY_SIZE + length:]
                pods = enricher.pods(source, destination, known[slot])
                if span[slot] and pods == known[slot]:  # the Pod map changed, not for it
                    span_generation[slot] = generation
                    continue
                pods = known[slot] = self._shared(pods)
                table.flow_type[slot] = flow_type(*pods, source, destination,
                                                  enricher.pod_networks)
            span[slot] = self._id(pods, label, STATE_NAMES[code] if key[0] == 6 else "")
            span_generation[slot] = generation

    def _find_without_pods(self, stale: np.ndarray, generation: int) -> None:
        """`find` where no Pod is known or can be found: the span is the TCP state and the
        labels. Without labels (most connections) each distinct state is looked up once,
        not once per connection; the flowType is unknown."""
        table = self.table
        states = np.where(np.asarray(table.protocols)[stale] == 6,
                          np.asarray(table.states)[stale], 0)
        labels = table.labels[stale]
        labelled = labels_differ(labels, np.zeros_like(labels))
        span_ids = np.empty(len(stale), "u4")
        plain = ~labelled
        plain_states = states[plain]
        by_state = np.zeros(int(plain_states.max(initial=0)) + 1, "u4")
        for code in np.flatnonzero(np.bincount(plain_states)).tolist():
            by_state[code] = self._id(NO_PODS, b"", STATE_NAMES[code])
        span_ids[plain] = by_state[plain_states]
        if labelled.any():
            span_ids[labelled] = [self._id(NO_PODS, label, STATE_NAMES[code])
                                  for code, label in zip(states[labelled].tolist(),
                                                         labels[labelled].tolist())]
        np.asarray(table.span)[stale] = span_ids
        np.asarray(table.span_generation)[stale] = generation
        np.asarray(table.flow_type)[stale] = FLOW_TYPE_UNKNOWN

    def _id(self, pods: tuple, labels: bytes, state: str) -> int:
        """The id in `encoded` of this span, encoded the first time it is seen."""
        values = (pods, labels, state)
        span_id = self._ids.get(values)
        if span_id is None:
            encoded = self._encode(*values)  # registered only once encoded
            span_id = self._ids[values] = len(self.encoded)
            self.encoded.append(encoded)
            if span_id == len(self.lengths):
                self.lengths = np.resize(self.lengths, 2 * span_id)
            self.lengths[span_id] = len(encoded)
        return span_id

    def _encode(self, pods: tuple, labels: bytes, state: str) -> bytes:
        """Filled as a deny record is, by the enricher (a record object once per distinct
        span, not per record)."""
        record = FlowRecord(CONNTRACK, b"", b"", 0, tcp_state=state, labels=labels)
        if self.enricher is not None:
            self.enricher.name(record, pods)
        return _SPAN.span.encode_record(_SPAN.span_values(record))
