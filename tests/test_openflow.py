"""The openflow package in OpenFlow 1.3 and 1.5: our bytes as ovs-ofctl reads them and as it
writes them itself, what Open vSwitch answers (flows, counters, meters, table names,
packet-ins with registers) decoded, version negotiation, malformed input, and a connection
that survives a bad message."""

import asyncio
import re
import socket
import struct

import pytest
from hypothesis import given, strategies as st

from lab.ovs_lab import OvsLab
from ofctl import OPENFLOW, ofctl_sends, ofp_parse
from openflow import messages as m
from openflow import oxm
from openflow.connection import ConnectionClosed, OpenFlowConnection

COOKIE = 0x6F7673666C6F7700
VERSIONS = [pytest.param(m.OFP13, id="OF1.3"), pytest.param(m.OFP15, id="OF1.5")]
NAME = {m.OFP13: "OF1.3", m.OFP15: "OF1.5"}
BRIDGE_PROTOCOLS = {m.OFP13: ("OpenFlow10", "OpenFlow13"), m.OFP15: ("OpenFlow10", "OpenFlow15")}
CONTROLLER = m.ControllerAction(28518, 128, m.OFPR_ACTION)
# Ethernet, IPv4 10.0.0.1 > 10.0.0.2, UDP 1000 > 53: for ovs-ofctl packet-out
UDP_FRAME = (bytes.fromhex("02000000000102000000000208004500001c00010000401100000a0000010a000002")
             + struct.pack("!HHHH", 1000, 53, 8, 0))


@pytest.mark.parametrize("version", VERSIONS)
def test_ovs_ofctl_reads_our_requests(tmp_path, version):
    v, name = version, NAME[version]
    lines = ofp_parse(
        tmp_path, m.set_config(2, miss_send_len=128, version=v),
        m.set_controller_id(3, 7, version=v),
        m.set_packet_in_format(4, m.NXPIF_NXT_PACKET_IN2, version=v),
        m.barrier_request(5, version=v), m.features_request(6, version=v),
        m.echo_request(7, version=v), m.meter_stats_request(8, 250, version=v))
    assert lines == [
        f"OFPT_SET_CONFIG ({name}) (xid=0x2): frags=normal miss_send_len=128",
        f"NXT_SET_CONTROLLER_ID ({name}) (xid=0x3): id=7",
        f"NXT_SET_PACKET_IN_FORMAT ({name}) (xid=0x4): format=nxt_packet_in2",
        f"OFPT_BARRIER_REQUEST ({name}) (xid=0x5):", f"OFPT_FEATURES_REQUEST ({name}) (xid=0x6):",
        f"OFPT_ECHO_REQUEST ({name}) (xid=0x7): 0 bytes of payload",
        f"OFPST_METER request ({name}) (xid=0x8): meter=250"]


def test_our_hello_offers_both_versions_and_ovs_ofctl_reads_it(tmp_path):
    assert ofp_parse(tmp_path, m.hello(1), m.hello(2, (m.OFP13,))) == [
        "OFPT_HELLO (OF1.5) (xid=0x1):", " version bitmap: 0x04, 0x06",
        "OFPT_HELLO (OF1.3) (xid=0x2):", " version bitmap: 0x04"]


@pytest.mark.parametrize("version", VERSIONS)
def test_ovs_ofctl_reads_our_flow_and_meter_mods(tmp_path, version):
    v, name = version, NAME[version]
    lines = ofp_parse(
        tmp_path,
        m.flow_mod(1, version=v, command=m.OFPFC_ADD, table_id=250, priority=200,
                   cookie=COOKIE, match=[oxm.field("eth_type", 0x86DD),
                                         oxm.field("ip_proto", 58)],
                   instructions=m.Instructions(9, (CONTROLLER,))),
        m.flow_mod(2, version=v, command=m.OFPFC_DELETE_STRICT, table_id=250, priority=200,
                   cookie=COOKIE, cookie_mask=2**64 - 1,
                   match=[oxm.field("eth_type", 0x0800), oxm.field("ip_proto", 6)]),
        m.flow_mod(3, version=v, command=m.OFPFC_ADD, table_id=3, priority=9,
                   match=[oxm.field("eth_type", 0x0800), oxm.field("reg3", 42),
                          oxm.field("ipv4_src", 0x0A000000, 0xFFFFFF00),
                          oxm.register_field(6, 7, 0xFF, version=v)],
                   instructions=m.Instructions(
                       None, (m.ControllerAction(5, 64, m.OFPR_ACTION, b"hi"),
                              m.RawAction(m.output(m.OFPP_CONTROLLER, 100))), goto_table=4)),
        m.flow_mod(4, version=v, command=m.OFPFC_ADD, table_id=5,
                   instructions=m.Instructions(meter_id=3)),
        m.meter_mod(5, version=v, command=m.OFPMC_ADD, meter_id=9,
                    flags=m.OFPMF_PKTPS | m.OFPMF_BURST, bands=[(m.OFPMBT_DROP, 5000, 500)]))
    assert lines[0] == (f"OFPT_FLOW_MOD ({name}) (xid=0x1): ADD table:250 priority=200,icmp6 "
                        "cookie:0x6f7673666c6f7700 actions=meter:9,"
                        "controller(max_len=128,id=28518)")
    assert lines[1] == (f"OFPT_FLOW_MOD ({name}) (xid=0x2): DEL_STRICT table:250 priority=200,"
                        "tcp cookie:0x6f7673666c6f7700/0xffffffffffffffff actions=drop")
    assert lines[2] == (f"OFPT_FLOW_MOD ({name}) (xid=0x3): ADD table:3 priority=9,ip,reg3=0x2a,"
                        "reg6=0x7/0xff,nw_src=10.0.0.0/24 actions=controller(max_len=64,id=5,"
                        "userdata=68.69),CONTROLLER:100,goto_table:4")
    assert lines[3] == f"OFPT_FLOW_MOD ({name}) (xid=0x4): ADD table:5 priority=0 actions=meter:3"
    assert lines[4:] == [f"OFPT_METER_MOD ({name}) (xid=0x5): ADD meter=9 pktps burst bands=",
                         "type=drop rate=5000 burst_size=500"]


@pytest.mark.parametrize("version", VERSIONS)
def test_ovs_ofctl_reads_our_multipart_group_and_config_requests(tmp_path, version):
    v, name = version, NAME[version]
    lines = ofp_parse(
        tmp_path,
        m.flow_stats_request(1, 250, COOKIE, 2**64 - 1, version=v),
        m.meter_config_request(2, 250, version=v), m.meter_config_request(3, version=v),
        m.table_features_request(4, version=v), m.get_config_request(5, version=v),
        m.group_mod(6, version=v, command=m.OFPGC_DELETE, group_id=m.OFPG_ALL),
        m.meter_mod(7, version=v, command=m.OFPMC_DELETE, meter_id=m.OFPM_ALL, flags=0,
                    bands=[]),
        m.flow_stats_request(8, match=[oxm.register_field(0, 0x400000, 0x600000, version=v)],
                             version=v))
    # ovs-ofctl prints no cookie of a flow stats request: the test below reads flows by
    # cookie from OVS itself. OFPG_ALL is group 4294967292.
    assert lines == [
        f"OFPST_FLOW request ({name}) (xid=0x1): table=250",
        f"OFPST_METER_CONFIG request ({name}) (xid=0x2): meter=250",
        f"OFPST_METER_CONFIG request ({name}) (xid=0x3): meter=all",
        f"OFPST_TABLE_FEATURES request ({name}) (xid=0x4):",
        f"OFPT_GET_CONFIG_REQUEST ({name}) (xid=0x5):",
        f"OFPT_GROUP_MOD ({name}) (xid=0x6):", " DEL group_id=4294967292,type=all",
        f"OFPT_METER_MOD ({name}) (xid=0x7): DEL meter=all bands=",
        f"OFPST_FLOW request ({name}) (xid=0x8): reg0=0x400000/0x600000"]


@pytest.mark.parametrize("version", VERSIONS)
def test_our_messages_are_byte_for_byte_what_ovs_ofctl_sends(tmp_path, version):
    """ovs-ofctl's own encoding of the same requests, sent to a scripted switch: each
    command's HELLO (xid 1), its request (xid 2) and, for modifications, the barrier after."""
    v = version

    def sends(*args):
        return ofctl_sends(tmp_path, "-O", OPENFLOW[v], *args)

    hello, add, barrier = sends(
        "add-flow", "SWITCH", "table=250,priority=200,cookie=0x6f7673666c6f7700,udp6,"
        "actions=meter:250,controller(max_len=128,id=28518)")
    assert hello == m.hello(1, (v,))
    assert barrier == m.barrier_request(3, version=v)
    assert add == m.flow_mod(2, version=v, command=m.OFPFC_ADD, table_id=250, priority=200,
                             cookie=COOKIE, match=[oxm.field("eth_type", 0x86DD),
                                                   oxm.field("ip_proto", 17)],
                             instructions=m.Instructions(250, (CONTROLLER,)))
    _, delete, _ = sends("del-flows", "--strict", "SWITCH",
                         "table=250,priority=200,cookie=0x6f7673666c6f7700/-1,tcp")
    assert delete == m.flow_mod(2, version=v, command=m.OFPFC_DELETE_STRICT, table_id=250,
                                priority=200, cookie=COOKIE, cookie_mask=2**64 - 1,
                                match=[oxm.field("eth_type", 0x0800), oxm.field("ip_proto", 6)])
    _, meter, _ = sends("add-meter", "SWITCH",
                        "meter=250,pktps,burst,stats,band=type=drop,rate=5000,burst_size=500")
    assert meter == m.meter_mod(2, version=v, command=m.OFPMC_ADD, meter_id=250,
                                flags=m.OFPMF_PKTPS | m.OFPMF_BURST | m.OFPMF_STATS,
                                bands=[(m.OFPMBT_DROP, 5000, 500)])
    _, meters, _ = sends("del-meters", "SWITCH")
    assert meters == m.meter_mod(2, version=v, command=m.OFPMC_DELETE, meter_id=m.OFPM_ALL,
                                 flags=0, bands=[])
    _, groups, _ = sends("del-groups", "SWITCH")
    assert groups == m.group_mod(2, version=v, command=m.OFPGC_DELETE, group_id=m.OFPG_ALL)
    _, flows = sends("dump-flows", "SWITCH", "table=250,cookie=0x6f7673666c6f7700/-1")
    assert flows == m.flow_stats_request(2, 250, COOKIE, 2**64 - 1, version=v)
    _, to_controller = sends("dump-flows", "SWITCH", "reg0=0x400000/0x600000")
    assert to_controller == m.flow_stats_request(
        2, match=[oxm.register_field(0, 0x400000, 0x600000, version=v)], version=v)
    _, stats = sends("meter-stats", "SWITCH", "meter=256")
    assert stats == m.meter_stats_request(2, 256, version=v)
    _, config = sends("dump-meters", "SWITCH", "meter=250")
    assert config == m.meter_config_request(2, 250, version=v)
    _, features = ofctl_sends(tmp_path, "-O", OPENFLOW[v], "dump-table-features", "SWITCH",
                              complete=False)
    assert features == m.table_features_request(2, version=v)


def test_a_hello_offering_both_versions_is_byte_for_byte_ovs_ofctls(tmp_path):
    hello, *_ = ofctl_sends(tmp_path, "-O", "OpenFlow13,OpenFlow15", "del-meters", "SWITCH")
    assert hello == m.hello(1)


@pytest.mark.parametrize("offered, switch, expected", [
    ((m.OFP13, m.OFP15), m.Hello(1, (1, 6), 6), m.OFP15),  # a real Antrea node's br-int
    ((m.OFP13, m.OFP15), m.Hello(1, (1, 4), 4), m.OFP13),
    ((m.OFP13, m.OFP15), m.Hello(1, (1, 4, 5, 6), 6), m.OFP15),
    ((m.OFP13, m.OFP15), m.Hello(1, (1,), 1), None),
    ((m.OFP15,), m.Hello(1, (1, 4), 4), None),
    ((m.OFP13, m.OFP15), m.Hello(1, (), 4), m.OFP13),  # no bitmap: the lower header's
    ((m.OFP13, m.OFP15), m.Hello(1, (), 5), None),  # 1.4: we do not speak it
    ((m.OFP13, m.OFP15), m.Hello(1, (), 9), m.OFP15),
])
def test_negotiation_takes_the_highest_version_both_offer(offered, switch, expected):
    assert m.negotiate(offered, switch) == expected


@pytest.mark.parametrize("protocols, offered, expected", [
    (("OpenFlow10", "OpenFlow15"), m.VERSIONS, m.OFP15),
    (("OpenFlow10", "OpenFlow13"), m.VERSIONS, m.OFP13),
    (("OpenFlow10", "OpenFlow13", "OpenFlow15"), m.VERSIONS, m.OFP15),
    (("OpenFlow10", "OpenFlow13", "OpenFlow15"), (m.OFP13,), m.OFP13),
    (("OpenFlow10", "OpenFlow15"), (m.OFP13,), "no OpenFlow version in common: the switch "
                                               "offers 1.0, 1.5, this connection 1.3"),
    (("OpenFlow10",), m.VERSIONS, "no OpenFlow version in common: the switch offers 1.0, "
                                  "this connection 1.3, 1.5"),
])
def test_open_vswitch_and_the_connection_agree_on_a_version(tmp_path, protocols, offered,
                                                             expected):
    """A bridge of each protocol set a node may have; the connection never changes it."""
    lab = OvsLab(tmp_path / "ovs", protocols=protocols)

    async def connect():
        try:
            connection = await OpenFlowConnection.open_unix(f"{lab.run_dir}/br0.mgmt",
                                                            versions=offered)
        except ConnectionClosed as err:
            return str(err)
        reply = await connection.request(
            lambda xid: m.features_request(xid, version=connection.version))
        await connection.close()
        return connection.version if isinstance(reply, m.FeaturesReply) else reply

    try:
        result = asyncio.run(connect())
        after = lab.vsctl("get", "bridge", "br0", "protocols").strip()
    finally:
        lab.stop()
    assert result == expected
    assert after == "[" + ", ".join(protocols) + "]"


def packet_in_bytes(xid, cookie, table, fields, data, reason=m.OFPR_ACTION, version=m.OFP13):
    match = oxm.encode_match(fields)
    body = struct.pack("!IHBBQ", m.OFP_NO_BUFFER, len(data), reason, table, cookie) + match
    body += b"\0\0" + data
    return m.HEADER.pack(version, m.OFPT_PACKET_IN, 8 + len(body), xid) + body


field_values = st.builds(
    lambda name, value: oxm.field(name, value % (1 << (8 * oxm._WIDTHS.get(name, 4)))),
    st.sampled_from(["in_port", "eth_type", "ip_proto", "ipv4_src", "reg3", "reg0", "ct_zone",
                     "tcp_dst", "metadata", "xreg1"]),
    st.integers(0, 2**64 - 1))


@given(st.lists(field_values, max_size=8), st.binary(max_size=300), st.integers(0, 2**64 - 1),
       st.integers(0, 254), st.integers(0, 2**32 - 1), st.sampled_from([m.OFP13, m.OFP15]))
def test_packet_in_round_trip(fields, data, cookie, table, xid, version):
    message = m.decode(packet_in_bytes(xid, cookie, table, fields, data, version=version))
    assert isinstance(message, m.PacketIn)
    assert (message.xid, message.cookie, message.table_id, message.data) == (
        xid, cookie, table, data)
    assert message.match == fields


@given(st.integers(0, 15), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
       st.booleans(), st.booleans())
def test_registers_read_alike_from_both_shapes(number, value, other, masked, other_present):
    """OpenFlow 1.3's NXM_NX_REG<n> and 1.5's OXM_OF_PKT_REG<n/2> half, as OVS sends them in
    a packet-in: a zero register's half masked out."""
    pair = (value, other) if number % 2 == 0 else (other, value)
    high, low = pair
    mask = (0xFFFFFFFF if high or not masked else 0) << 32 | (0xFFFFFFFF if low or not masked
                                                              else 0)
    xreg = oxm.Field(oxm.OFPXMC_PACKET_REGS, number // 2, (high << 32 | low).to_bytes(8, "big"),
                     mask.to_bytes(8, "big") if masked else None)
    assert oxm.register([xreg], number) == value
    nxm = [oxm.field(f"reg{number}", value)] if value or not other_present else []
    assert oxm.register(nxm, number) == value
    assert oxm.register([oxm.field("reg9" if number != 9 else "reg8", 5)], number) == 0


@pytest.mark.parametrize("version", VERSIONS)
def test_a_packet_in_of_open_vswitch_with_its_registers(tmp_path, version):
    """A UDP packet sent into table 0 by ovs-ofctl packet-out; the flow there loads reg0 and
    reg3, leaves reg2 zero, and sends it to our controller id with userdata, in
    NXT_PACKET_IN2 and as a standard packet-in."""
    lab = OvsLab(tmp_path / "ovs", protocols=BRIDGE_PROTOCOLS[version])

    async def packet_ins():
        connection = await OpenFlowConnection.open_unix(f"{lab.run_dir}/br0.mgmt")
        v = connection.version
        received = []
        try:
            for packet_in_format in (m.NXPIF_NXT_PACKET_IN2, m.NXPIF_STANDARD):
                await connection.transact([
                    lambda xid: m.set_config(xid, miss_send_len=128, version=v),
                    lambda xid: m.set_controller_id(xid, 9, version=v),
                    lambda xid, f=packet_in_format: m.set_packet_in_format(xid, f, version=v)])
                await asyncio.to_thread(lab.ofctl, "packet-out",
                                        f"in_port=controller packet={UDP_FRAME.hex()} "
                                        "actions=resubmit(,0)")
                received.append(await asyncio.wait_for(connection.events.get(), 10))
        finally:
            await connection.close()
        return v, received

    try:
        lab.ofctl("add-flow", "table=0,cookie=0x77,priority=1,udp,actions=load:0x5->NXM_NX_REG3[],"
                              "load:0x2400c00->NXM_NX_REG0[],"
                              "controller(id=9,reason=no_match,userdata=01.02)")
        negotiated, (packet_in2, standard) = asyncio.run(packet_ins())
    finally:
        lab.stop()
    assert negotiated == version
    for message in (packet_in2, standard):
        assert isinstance(message, m.PacketIn)
        assert (message.register(0), message.register(2), message.register(3)) == (
            0x2400C00, 0, 5)
        assert message.data == UDP_FRAME and message.table_id == 0 and message.cookie == 0x77
        classes = {f.oxm_class for f in message.match}
        # over 1.5 the registers come as OXM_OF_PKT_REG pairs, never as NXM_NX_REG
        assert (oxm.OFPXMC_PACKET_REGS in classes, oxm.OFPXMC_NXM_1 in classes) == (
            (True, False) if version == m.OFP15 else (False, True))
    assert packet_in2.userdata == b"\x01\x02" and standard.userdata == b""


def test_nxt_packet_in2_with_userdata():
    def prop(kind, payload):
        length = 4 + len(payload)
        return struct.pack("!HH", kind, length) + payload + b"\0" * (-length % 8)

    body = (prop(m.NXPINT_PACKET, b"\x01\x02\x03") + prop(m.NXPINT_FULL_LEN, b"\0\0\0\x40")
            + prop(m.NXPINT_TABLE_ID, b"\xfa") + prop(m.NXPINT_COOKIE,
                                                      b"\0" * 4 + COOKIE.to_bytes(8, "big"))
            + prop(m.NXPINT_REASON, b"\x01")
            + prop(m.NXPINT_METADATA, oxm.field("reg3", 42).encode())
            + prop(m.NXPINT_USERDATA, b"rule-7"))
    message = m.decode(m.nicira(5, m.NXT_PACKET_IN2, body, version=m.OFP15))
    assert isinstance(message, m.PacketIn)
    assert (message.table_id, message.cookie, message.total_len, message.userdata) == (
        250, COOKIE, 64, b"rule-7")
    assert message.register(3) == 42 and message.data == b"\x01\x02\x03"


def test_errors_are_readable():
    body = struct.pack("!HH", 12, 1) + b"\0" * 8
    message = m.decode(m.HEADER.pack(6, m.OFPT_ERROR, 8 + len(body), 77) + body)
    assert isinstance(message, m.Error)
    assert "METER_MOD_FAILED/METER_EXISTS" in str(message.error) and message.error.xid == 77


def multipart_reply(version, multipart_type, body, xid=1, flags=0):
    payload = struct.pack("!HH4x", multipart_type, flags) + body
    return m.HEADER.pack(version, m.OFPT_MULTIPART_REPLY, 8 + len(payload), xid) + payload


@pytest.mark.parametrize("data, fragment", [
    (b"\x04\x0a", "shorter than a header"),
    (m.HEADER.pack(4, 10, 20, 1) + b"\0" * 4, "header says 20 bytes"),
    (m.HEADER.pack(4, 10, 12, 1) + b"\0" * 4, "OFPT_PACKET_IN needs 16 bytes"),
    (m.HEADER.pack(4, 10, 32, 1) + b"\0" * 16 + struct.pack("!HH", 1, 99) + b"\0" * 4,
     "ofp_match of type 1, length 99"),
    (m.HEADER.pack(4, 10, 36, 1) + b"\0" * 16 + struct.pack("!HHI", 1, 12, 0x80000a10) +
     b"\0" * 4, "claims 16 bytes"),
    (multipart_reply(6, m.OFPMP_FLOW, struct.pack("!H22x", 20)),
     "flow desc entry of length 20 does not fit"),
    (multipart_reply(6, m.OFPMP_FLOW, struct.pack("!H22x", 32) + struct.pack("!HH4x", 1, 4)),
     "OXS statistics needs 4 bytes, has 0"),
    (multipart_reply(6, m.OFPMP_FLOW, struct.pack("!H22x", 48) + struct.pack("!HH4x", 1, 4)
                     + struct.pack("!HHI8x", 0, 12, 0x80020808)),
     "OXS field 0x8002:4 claims 8 bytes, 4 left"),
    (multipart_reply(4, m.OFPMP_FLOW, struct.pack("!H54x", 56)),
     "ofp_match of type 0"),
    (multipart_reply(6, m.OFPMP_METER, struct.pack("!IH34x", 1, 48)),
     "meter stats entry of length 48 does not fit"),
    (multipart_reply(6, m.OFPMP_METER, struct.pack("!IH34x", 1, 40) + b"\0" * 8),
     "meter stats entry needs 40 bytes, has 8"),
    (multipart_reply(6, m.OFPMP_TABLE_FEATURES, struct.pack("!H62x", 200)),
     "table features entry of length 200 does not fit"),
])
def test_malformed_messages_raise_clear_errors(data, fragment):
    with pytest.raises(m.DecodeError, match=fragment):
        m.decode(data)


@pytest.mark.fuzz
@given(st.binary(max_size=200), st.sampled_from([m.OFP13, m.OFP15]))
def test_fuzzed_messages_decode_or_raise_decode_error(data, version):
    message = m.HEADER.pack(version, data[0] % 32 if data else 10, 8 + len(data), 1) + data
    try:
        decoded = m.decode(message)
    except m.DecodeError:
        return
    assert isinstance(decoded, m.Message) and decoded.xid == 1


@pytest.mark.fuzz
@given(st.sampled_from([m.OFPMP_FLOW, m.OFPMP_METER, m.OFPMP_METER_CONFIG,
                        m.OFPMP_TABLE_FEATURES]),
       st.binary(max_size=400), st.sampled_from([m.OFP13, m.OFP15]))
def test_fuzzed_multipart_replies_decode_or_raise_decode_error(multipart_type, body, version):
    """Entries whose lengths fit, as a switch would frame them, with random insides."""
    try:
        decoded = m.decode(multipart_reply(version, multipart_type, body))
    except m.DecodeError:
        return
    assert decoded.xid == 1 and not decoded.more


actions = st.lists(st.one_of(
    st.builds(m.ControllerAction, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),
              st.integers(0, 255), st.binary(max_size=20)),
    st.builds(lambda port, max_len: m.RawAction(m.output(port, max_len)),
              st.integers(0, 2**32 - 1), st.integers(0, 0xFFFF))), max_size=4)
instructions = st.builds(
    m.Instructions, st.none() | st.integers(1, 2**32 - 1), actions.map(tuple),
    st.none() | st.integers(0, 254))


@given(instructions, st.sampled_from([m.OFP13, m.OFP15]))
def test_instructions_read_back_as_written_in_either_version(written, version):
    """The meter goes where `version` wants it, and comes back as `meter_id` either way."""
    encoded = written.encode(version)
    assert m.decode_instructions(encoded) == written
    kinds = [struct.unpack_from("!H", encoded, pos)[0] for pos in _instruction_offsets(encoded)]
    assert (m.OFPIT_METER in kinds) == (written.meter_id is not None and version == m.OFP13)


def _instruction_offsets(encoded):
    pos = 0
    while pos < len(encoded):
        yield pos
        pos += struct.unpack_from("!H", encoded, pos + 2)[0]


def flow_desc15(table, priority, cookie, match, oxs, instructions_bytes, flags=0, importance=0,
                idle_timeout=0, hard_timeout=0):
    """An OpenFlow 1.5 flow stats reply entry laid out as OVS's
    ofputil_append_flow_stats_reply writes it (ofp15_flow_desc, match, ofp_oxs_stat with its
    fields then padding, instructions): written here, not with the codec under test."""
    match_bytes = oxm.encode_match(match)
    stats = b"".join(struct.pack("!HBB", 0x8002, field << 1, len(value)) + value
                     for field, value in oxs)
    stats = struct.pack("!HH", 0, 4 + len(stats)) + stats
    stats += b"\0" * (-len(stats) % 8)
    length = 24 + len(match_bytes) + len(stats) + len(instructions_bytes)
    return struct.pack("!H2xBxHHHHHQ", length, table, priority, idle_timeout, hard_timeout,
                       flags, importance, cookie) + match_bytes + stats + instructions_bytes


@given(st.integers(0, 254), st.integers(0, 0xFFFF), st.integers(0, 2**64 - 1),
       st.lists(field_values, max_size=4), instructions,
       st.none() | st.integers(0, 2**64 - 2), st.none() | st.integers(0, 2**64 - 2),
       st.none() | st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 999_999_999)),
       st.none() | st.integers(0, 2**32 - 1), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),
       st.booleans())
def test_open_flow_15_flow_stats_entries_decode(table, priority, cookie, match, written,
                                                packets, octets, duration, idle, flags,
                                                importance, with_flow_count):
    oxs = []
    if duration is not None:
        oxs.append((0, struct.pack("!II", *duration)))
    if idle is not None:
        oxs.append((1, struct.pack("!II", idle, 0)))
    if packets is not None:
        oxs.append((4, struct.pack("!Q", packets)))
    if octets is not None:
        oxs.append((5, struct.pack("!Q", octets)))
    if with_flow_count:
        oxs.append((3, struct.pack("!I", 7)))
    entry = flow_desc15(table, priority, cookie, match, oxs, written.encode(m.OFP15), flags,
                        importance, 10, 20)
    reply = m.decode(multipart_reply(m.OFP15, m.OFPMP_FLOW, entry + entry, flags=1))
    assert isinstance(reply, m.FlowStats) and reply.more and len(reply.flows) == 2
    flow = reply.flows[1]
    assert (flow.table_id, flow.priority, flow.cookie, flow.match, flow.instructions) == (
        table, priority, cookie, match, written)
    assert (flow.packet_count, flow.byte_count, flow.idle_age) == (packets, octets, idle)
    assert (flow.duration_sec, flow.duration_nsec) == (duration or (None, None))
    assert (flow.flags, flow.importance, flow.idle_timeout, flow.hard_timeout) == (
        flags, importance, 10, 20)


@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
                          st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1),
                          st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
                          st.lists(st.tuples(st.integers(0, 2**64 - 1),
                                             st.integers(0, 2**64 - 1)), max_size=3)),
                unique_by=lambda t: t[0], max_size=4),
       st.sampled_from([m.OFP13, m.OFP15]))
def test_meter_stats_entries_decode(meters, version):
    body = b"".join(
        struct.pack("!IH6xIQQII", meter_id, 40 + 16 * len(bands), flows, packets, octets,
                    seconds, nanoseconds) + b"".join(struct.pack("!QQ", *b) for b in bands)
        for meter_id, flows, packets, octets, seconds, nanoseconds, bands in meters)
    reply = m.decode(multipart_reply(version, m.OFPMP_METER, body))
    assert reply.meters == {
        meter_id: m.MeterStat(flows, packets, octets, seconds, nanoseconds, tuple(bands))
        for meter_id, flows, packets, octets, seconds, nanoseconds, bands in meters}
    for meter_id, *_, bands in meters:
        assert reply.meters[meter_id].packets_dropped == sum(p for p, _ in bands)


def test_the_connection_survives_a_malformed_message():
    """A peer we script plays the switch over a real unix socketpair."""
    async def scenario():
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        connection = OpenFlowConnection(reader, writer)
        switch_reader, switch_writer = await asyncio.open_unix_connection(sock=theirs)
        switch_writer.write(m.hello(1))
        await connection._handshake()
        switch_writer.write(m.HEADER.pack(6, m.OFPT_PACKET_IN, 12, 2) + b"\0" * 4)
        switch_writer.write(packet_in_bytes(3, COOKIE, 250, [oxm.field("reg3", 9)], b"x",
                                            version=m.OFP15))
        switch_writer.write(m.echo_request(4, b"ping", version=m.OFP15))
        event = await asyncio.wait_for(connection.events.get(), 5)
        assert isinstance(m.decode(await switch_reader.readexactly(16)), m.Hello)  # ours
        echo = await switch_reader.readexactly(12)
        switch_writer.close()
        end = await asyncio.wait_for(connection.events.get(), 5)
        await connection.close()
        return connection, event, echo, end

    connection, event, echo, end = asyncio.run(scenario())
    assert connection.malformed == 1 and connection.version == m.OFP15
    assert isinstance(event, m.PacketIn) and event.register(3) == 9
    assert echo == m.echo_reply(4, b"ping", version=m.OFP15)  # in the negotiated version
    assert end is None  # the stream ended, and the reader said so


def test_a_transaction_with_many_refusals_raises_the_first_and_keeps_none(tmp_path):
    """Open vSwitch itself refuses: a flow limit of 1 with overflow_policy=refuse makes every
    further ADD in table 250 fail with TABLE_FULL. The connection must not keep the errors
    it did not raise (a long-lived session would collect every refusal it ever saw)."""
    lab = OvsLab(tmp_path / "ovs")
    try:
        lab.vsctl("--", "--id=@ft", "create", "Flow_Table", "flow_limit=1",
                  "overflow_policy=refuse", "--", "set", "Bridge", lab.bridge,
                  "flow_tables:250=@ft")

        async def scenario():
            connection = await OpenFlowConnection.open_unix(f"{lab.run_dir}/br0.mgmt")

            def add(priority):
                return lambda xid: m.flow_mod(xid, version=connection.version,
                                              command=m.OFPFC_ADD, table_id=250,
                                              priority=priority, cookie=COOKIE)
            try:
                with pytest.raises(m.OpenFlowError) as refused:
                    await connection.transact([add(p) for p in range(1, 6)])
                return refused.value, dict(connection._errors)
            finally:
                await connection.close()

        error, kept = asyncio.run(scenario())
        flows = lab.ofctl("dump-flows", "table=250")
    finally:
        lab.stop()
    assert "FLOW_MOD_FAILED/TABLE_FULL" in str(error)
    # xid 1 was HELLO, 2 the one flow that fit: 3 is the first refusal, 4-6 were not raised
    assert error.xid == 3
    assert kept == {}
    assert flows.count("priority=1 ") == 1 and "priority=2" not in flows


@pytest.mark.parametrize("version", VERSIONS)
def test_flows_meters_and_table_names_read_back_from_open_vswitch(tmp_path, version):
    """What OVS answers to our multipart requests, decoded: flows added by ovs-ofctl (an
    Antrea logging flow with NXAST_CONTROLLER2 userdata, a plain controller action, a goto
    and a group), their meter, and table names set through table features."""
    lab = OvsLab(tmp_path / "ovs", protocols=BRIDGE_PROTOCOLS[version])
    try:
        lab.ofctl("add-meter", "meter=256,pktps,burst,band=type=drop,rate=5000,"
                               "burst_size=10000")
        lab.ofctl("add-group", "group_id=2,type=all,bucket=actions=resubmit(,15)")
        lab.ofctl("add-flow", "table=28,priority=200,cookie=0x1020000000001,"
                              "reg0=0x2400000/0xfe600000,actions=meter:256,"
                              "controller(reason=no_match,id=62373,userdata=01.01)")
        lab.ofctl("add-flow", "table=28,priority=200,cookie=0x1020000000002,"
                              "reg0=0x200000/0x600000,actions=output:NXM_NX_REG1[]")
        lab.ofctl("add-flow", f"table=250,priority=200,cookie={COOKIE},udp,"
                              "actions=controller(max_len=128,id=28518)")
        lab.ofctl("add-flow", "table=250,priority=100,cookie=0x99,tcp,actions=drop")
        lab.ofctl("add-flow", "table=12,priority=5,actions=group:2,goto_table:13")

        async def scenario():
            connection = await OpenFlowConnection.open_unix(f"{lab.run_dir}/br0.mgmt")
            v = connection.version
            try:
                everything = await connection.request_all(
                    lambda xid: m.flow_stats_request(xid, version=v))
                ours = await connection.request_all(
                    lambda xid: m.flow_stats_request(xid, 250, COOKIE, 2**64 - 1, version=v))
                to_controller = await connection.request_all(lambda xid: m.flow_stats_request(
                    xid, match=[oxm.register_field(0, 0x400000, 0x600000, version=v)],
                    version=v))
                meters = await connection.request_all(
                    lambda xid: m.meter_config_request(xid, version=v))
                features = await connection.request_all(
                    lambda xid: m.table_features_request(xid, version=v))
                xid = connection.next_xid()  # one xid for every part, as OVS wants
                for part in features:
                    connection.send(m.table_features_request(
                        xid, [t.renamed("Output") if t.table_id == 28 else t.raw
                              for t in part.tables], m.OFPMPF_MORE if part.more else 0,
                        version=v))
                await connection.transact([])
                renamed = await connection.request_all(
                    lambda xid: m.table_features_request(xid, version=v))
                config = await connection.request(lambda xid: m.get_config_request(xid,
                                                                                   version=v))
                return (v, everything, ours, to_controller, meters, features, renamed,
                        config)
            finally:
                await connection.close()

        (negotiated, everything, ours, to_controller, meters, features, renamed,
         config) = asyncio.run(scenario())
        names = lab.ofctl("dump-flows", "--names", "table=28")
    finally:
        lab.stop()
    assert negotiated == version
    flows = {f.cookie: f for part in everything for f in part.flows}
    assert sorted(flows) == [0, 0x99, 0x1020000000001, 0x1020000000002, COOKIE]
    output = flows[0x1020000000001]
    assert (output.table_id, output.priority) == (28, 200)
    assert oxm.register(output.match, 0) == 0x2400000 and len(output.match) == 1
    assert output.instructions == m.Instructions(
        256, (m.ControllerAction(62373, 0xFFFF, m.OFPR_NO_MATCH, b"\x01\x01"),))
    assert flows[COOKIE].instructions.actions == (m.ControllerAction(28518, 128,
                                                                     m.OFPR_ACTION),)
    assert flows[0x99].instructions == m.Instructions()  # actions=drop: no instruction
    goto = flows[0].instructions
    assert goto.goto_table == 13 and len(goto.actions) == 1
    assert isinstance(goto.actions[0], m.RawAction)  # group:2, kept as its bytes
    assert [(f.table_id, f.cookie) for part in ours for f in part.flows] == [(250, COOKIE)]
    # loosely matched on OutputToControllerRegMark: the logging flow, not the output flow
    assert [f.cookie for part in to_controller for f in part.flows] == [0x1020000000001]
    assert meters[0].meters == {256: (m.OFPMF_PKTPS | m.OFPMF_BURST,
                                      ((m.OFPMBT_DROP, 5000, 10000),))}
    assert [part.more for part in features] == [True] * (len(features) - 1) + [False]
    assert sorted(t.table_id for part in features for t in part.tables) == list(range(254))
    assert {t.table_id: t.name for part in renamed for t in part.tables
            if t.table_id in (27, 28)} == {27: "", 28: "Output"}
    assert "table=Output" in names
    assert (config.flags, config.miss_send_len) == (0, 0)  # a new service connection's


def _ofctl_counts(text: str) -> dict[int, tuple[int, int]]:
    """cookie -> (n_packets, n_bytes) from ovs-ofctl dump-flows."""
    return {int(c, 16): (int(p), int(b)) for c, p, b in re.findall(
        r"cookie=(0x[0-9a-f]+), duration=\S+ table=\d+, n_packets=(\d+), n_bytes=(\d+)", text)}


@pytest.mark.parametrize("version", VERSIONS)
def test_flow_and_meter_counters_agree_with_ovs_ofctl(tmp_path, version):
    """Packets sent through two flows and a meter with ovs-ofctl packet-out: the counters
    we decode (1.5: OXS fields) are ovs-ofctl's, and the meter's drops are its band's."""
    lab = OvsLab(tmp_path / "ovs", protocols=BRIDGE_PROTOCOLS[version])

    async def read():
        connection = await OpenFlowConnection.open_unix(f"{lab.run_dir}/br0.mgmt")
        v = connection.version
        try:
            flows = await connection.request_all(lambda xid: m.flow_stats_request(
                xid, 0, version=v))
            meters = await connection.request(lambda xid: m.meter_stats_request(
                xid, 300, version=v))
            return flows, meters
        finally:
            await connection.close()

    try:
        lab.ofctl("add-meter", "meter=300,pktps,burst,stats,band=type=drop,rate=1,"
                               "burst_size=1")
        lab.ofctl("add-flow", "table=0,cookie=0x1,priority=2,udp,tp_src=1000,"
                              "actions=meter:300")
        lab.ofctl("add-flow", "table=0,cookie=0x2,priority=1,actions=drop")
        for port in (1000,) * 7 + (2000,) * 3:
            packet = UDP_FRAME[:34] + struct.pack("!H", port) + UDP_FRAME[36:]
            lab.ofctl("packet-out", f"in_port=controller packet={packet.hex()} "
                                    "actions=resubmit(,0)")
        lab.appctl("revalidator/wait")
        flows, meters = asyncio.run(read())
        reference = _ofctl_counts(lab.ofctl("dump-flows", "table=0"))
        meter_text = lab.ofctl("meter-stats", "meter=300")
    finally:
        lab.stop()
    decoded = {f.cookie: (f.packet_count, f.byte_count) for part in flows for f in part.flows}
    assert decoded == reference == {1: (7, 7 * 42), 2: (3, 3 * 42)}
    for flow in (f for part in flows for f in part.flows):
        assert flow.duration_sec is not None and flow.duration_sec < 60
        assert (flow.idle_age is not None) == (version == m.OFP15)
    stat = meters.meters[300]
    in_count, in_bytes, band_packets = map(int, re.search(
        r"packet_in_count:(\d+) byte_in_count:(\d+) .*?packet_count:(\d+)", meter_text,
        re.S).groups())
    assert (stat.flow_count, stat.packet_in_count, stat.byte_in_count) == (1, in_count,
                                                                           in_bytes)
    assert in_count == 7 and stat.packets_dropped == band_packets >= 5


def test_a_multipart_reply_in_parts_is_gathered_in_order():
    """A peer we script sends a flow stats reply in two parts (OFPMPF_REPLY_MORE on the
    first), then an echo request that must not end the gathering."""
    def reply(xid, table, more):
        match = oxm.encode_match([])
        entry = struct.pack("!HBxIIHHHH4xQQQ", 48 + len(match), table, 0, 0, 7, 0, 0, 0, 9,
                            1, 2) + match
        body = struct.pack("!HH4x", m.OFPMP_FLOW, more) + entry
        return m.HEADER.pack(4, m.OFPT_MULTIPART_REPLY, 8 + len(body), xid) + body

    async def scenario():
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        connection = OpenFlowConnection(reader, writer)
        switch_reader, switch_writer = await asyncio.open_unix_connection(sock=theirs)
        switch_writer.write(m.hello(1, (m.OFP13,)))
        await connection._handshake()
        await switch_reader.readexactly(16)  # our HELLO
        request = asyncio.create_task(connection.request_all(
            lambda xid: m.flow_stats_request(xid, version=connection.version)))
        header = await switch_reader.readexactly(8)
        _, _, length, xid = m.HEADER.unpack(header)
        await switch_reader.readexactly(length - 8)
        switch_writer.write(reply(xid, 3, 1) + m.echo_request(99, version=m.OFP13)
                            + reply(xid, 4, 0))
        parts = await asyncio.wait_for(request, 5)
        switch_writer.close()
        await connection.close()
        return connection, parts

    connection, parts = asyncio.run(scenario())
    assert connection.version == m.OFP13
    assert [(p.more, [f.table_id for f in p.flows]) for p in parts] == [
        (True, [3]), (False, [4])]
    first = parts[0].flows[0]
    assert first.cookie == 9 and first.instructions == m.Instructions()
    assert (first.packet_count, first.byte_count) == (1, 2)
