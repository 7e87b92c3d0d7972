"""A flow's instructions and actions, the same objects in OpenFlow 1.3 and 1.5: encoded for
the session's version (a 1.5 meter is an action, a 1.3 one an instruction) and decoded from
either."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .wire import (
    NX_VENDOR_ID, NXAC2PT_CONTROLLER_ID, NXAC2PT_MAX_LEN, NXAC2PT_REASON, NXAC2PT_USERDATA,
    NXAST_CONTROLLER, NXAST_CONTROLLER2, OFP15, OFPAT_EXPERIMENTER, OFPAT_METER, OFPAT_OUTPUT,
    OFPCML_NO_BUFFER, OFPIT_APPLY_ACTIONS, OFPIT_GOTO_TABLE, OFPIT_METER, OFPR_ACTION,
    DecodeError, int_property,
)


def apply_actions(*actions: bytes) -> bytes:
    body = b"".join(actions)
    return struct.pack("!HH4x", OFPIT_APPLY_ACTIONS, 8 + len(body)) + body


def goto_table(table_id: int) -> bytes:
    return struct.pack("!HHB3x", OFPIT_GOTO_TABLE, 8, table_id)


def output(port: int, max_len: int = OFPCML_NO_BUFFER) -> bytes:
    return struct.pack("!HHIH6x", OFPAT_OUTPUT, 16, port, max_len)


def nx_controller(max_len: int, controller_id: int, reason: int = OFPR_ACTION) -> bytes:
    """NXAST_CONTROLLER: output to the controller connections with this id only."""
    return struct.pack("!HHIHHHBx", OFPAT_EXPERIMENTER, 16, NX_VENDOR_ID, NXAST_CONTROLLER,
                       max_len, controller_id, reason)


def nx_controller2(max_len: int, controller_id: int, userdata: bytes = b"",
                   reason: int = OFPR_ACTION) -> bytes:
    """NXAST_CONTROLLER2: like NXAST_CONTROLLER, plus userdata delivered in NXT_PACKET_IN2."""
    def prop(prop_type: int, payload: bytes) -> bytes:
        length = 4 + len(payload)
        return struct.pack("!HH", prop_type, length) + payload + b"\0" * (-length % 8)

    props = (prop(NXAC2PT_MAX_LEN, struct.pack("!H", max_len))
             + prop(NXAC2PT_CONTROLLER_ID, struct.pack("!H", controller_id))
             + prop(NXAC2PT_REASON, bytes((reason,))))
    if userdata:
        props += prop(NXAC2PT_USERDATA, userdata)
    return struct.pack("!HHIH6x", OFPAT_EXPERIMENTER, 16 + len(props), NX_VENDOR_ID,
                       NXAST_CONTROLLER2) + props


@dataclass(frozen=True)
class ControllerAction:
    """NXAST_CONTROLLER or NXAST_CONTROLLER2: a packet-in to the connections with this id."""

    controller_id: int
    max_len: int
    reason: int
    userdata: bytes = b""

    def encode(self) -> bytes:
        """NXAST_CONTROLLER where it can say it all (as OVS does), NXAST_CONTROLLER2 for
        userdata."""
        if self.userdata:
            return nx_controller2(self.max_len, self.controller_id, self.userdata, self.reason)
        return nx_controller(self.max_len, self.controller_id, self.reason)


@dataclass(frozen=True)
class RawAction:
    """Any other action, as its bytes: compared, not interpreted."""

    data: bytes

    def encode(self) -> bytes:
        return self.data


@dataclass(frozen=True)
class Instructions:
    """A flow's instructions, the same object in both versions: the meter of 1.3's
    OFPIT_METER or of the OFPAT_METER action that leads 1.5's apply-actions list is
    `meter_id`, and `encode` puts it back where `version` wants it."""

    meter_id: int | None = None
    actions: tuple[ControllerAction | RawAction, ...] = ()  # of OFPIT_APPLY_ACTIONS
    goto_table: int | None = None
    other: tuple[bytes, ...] = ()  # any other instruction, as its bytes

    def encode(self, version: int) -> bytes:
        actions = b"".join(action.encode() for action in self.actions)
        encoded = b""
        if self.meter_id is not None:
            if version >= OFP15:
                actions = struct.pack("!HHI", OFPAT_METER, 8, self.meter_id) + actions
            else:
                encoded = struct.pack("!HHI", OFPIT_METER, 8, self.meter_id)
        if actions:
            encoded += apply_actions(actions)
        encoded += b"".join(self.other)
        if self.goto_table is not None:
            encoded += goto_table(self.goto_table)
        return encoded


def decode_instructions(data: bytes) -> Instructions:
    """Either version's instructions (see `Instructions`)."""
    meter_id = goto = None
    actions: tuple = ()
    other = []
    pos = 0
    while len(data) - pos >= 4:
        kind, length = struct.unpack_from("!HH", data, pos)
        if length < 8 or pos + length > len(data):
            raise DecodeError(f"instruction {kind} of length {length} does not fit")
        if kind == OFPIT_METER:
            meter_id = struct.unpack_from("!I", data, pos + 4)[0]
        elif kind == OFPIT_GOTO_TABLE:
            goto = data[pos + 4]
        elif kind == OFPIT_APPLY_ACTIONS:
            actions = decode_actions(data[pos + 8:pos + length])
            if actions and isinstance(actions[0], RawAction) and \
                    struct.unpack_from("!HH", actions[0].data) == (OFPAT_METER, 8):
                meter_id = struct.unpack_from("!I", actions[0].data, 4)[0]
                actions = actions[1:]
        else:
            other.append(data[pos:pos + length])
        pos += length
    return Instructions(meter_id, actions, goto, tuple(other))


def decode_actions(data: bytes) -> tuple[ControllerAction | RawAction, ...]:
    actions = []
    pos = 0
    while len(data) - pos >= 4:
        kind, length = struct.unpack_from("!HH", data, pos)
        if length < 8 or length % 8 or pos + length > len(data):
            raise DecodeError(f"action {kind} of length {length} does not fit")
        action = data[pos:pos + length]
        actions.append(_controller_action(action) or RawAction(action))
        pos += length
    return tuple(actions)


def _controller_action(action: bytes) -> ControllerAction | None:
    if len(action) < 16 or struct.unpack_from("!HxxI", action) != (OFPAT_EXPERIMENTER,
                                                                    NX_VENDOR_ID):
        return None
    subtype = struct.unpack_from("!H", action, 8)[0]
    if subtype == NXAST_CONTROLLER:
        max_len, controller_id, reason = struct.unpack_from("!HHB", action, 10)
        return ControllerAction(controller_id, max_len, reason)
    if subtype != NXAST_CONTROLLER2:
        return None
    values: dict[int, bytes] = {}
    pos = 16
    while len(action) - pos >= 4:
        prop_type, length = struct.unpack_from("!HH", action, pos)
        if length < 4 or pos + length > len(action):
            raise DecodeError(f"NXAST_CONTROLLER2 property {prop_type} of length {length}")
        values[prop_type] = action[pos + 4:pos + length]
        pos += (length + 7) // 8 * 8

    return ControllerAction(int_property(values, NXAC2PT_CONTROLLER_ID, 2, 0),
                            int_property(values, NXAC2PT_MAX_LEN, 2, OFPCML_NO_BUFFER),
                            int_property(values, NXAC2PT_REASON, 1, OFPR_ACTION),
                            values.get(NXAC2PT_USERDATA, b""))
