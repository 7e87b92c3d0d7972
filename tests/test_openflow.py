"""The openflow package: our bytes as ovs-ofctl reads them, decoding, malformed input, and a
connection that survives a bad message."""

import asyncio
import socket
import struct
import subprocess

import pytest
from hypothesis import given, strategies as st

from openflow import messages as m
from openflow import oxm
from openflow.connection import OpenFlowConnection
from lab.ovs_lab import OvsLab

COOKIE = 0x6F7673666C6F7700


def ofp_parse(tmp_path, *encoded: bytes) -> list[str]:
    """ovs-ofctl's own decoding of our messages."""
    path = tmp_path / "messages.bin"
    path.write_bytes(b"".join(encoded))
    result = subprocess.run(["ovs-ofctl", "ofp-parse", str(path)], capture_output=True,
                            text=True, timeout=30, check=True)
    return result.stdout.splitlines()


def test_ovs_ofctl_reads_our_requests(tmp_path):
    lines = ofp_parse(
        tmp_path, m.hello(1), m.set_config(2, miss_send_len=128), m.set_controller_id(3, 7),
        m.set_packet_in_format(4, m.NXPIF_NXT_PACKET_IN2), m.barrier_request(5),
        m.features_request(6), m.echo_request(7), m.meter_stats_request(8, 250))
    assert lines == [
        "OFPT_HELLO (OF1.3) (xid=0x1):", " version bitmap: 0x04",
        "OFPT_SET_CONFIG (OF1.3) (xid=0x2): frags=normal miss_send_len=128",
        "NXT_SET_CONTROLLER_ID (OF1.3) (xid=0x3): id=7",
        "NXT_SET_PACKET_IN_FORMAT (OF1.3) (xid=0x4): format=nxt_packet_in2",
        "OFPT_BARRIER_REQUEST (OF1.3) (xid=0x5):", "OFPT_FEATURES_REQUEST (OF1.3) (xid=0x6):",
        "OFPT_ECHO_REQUEST (OF1.3) (xid=0x7): 0 bytes of payload",
        "OFPST_METER request (OF1.3) (xid=0x8): meter=250"]


def test_ovs_ofctl_reads_our_flow_and_meter_mods(tmp_path):
    lines = ofp_parse(
        tmp_path,
        m.flow_mod(1, command=m.OFPFC_ADD, table_id=250, priority=200, cookie=COOKIE,
                   match=[oxm.field("eth_type", 0x86DD), oxm.field("ip_proto", 58)],
                   instructions=m.meter(9) + m.apply_actions(m.nx_controller(128, 28518))),
        m.flow_mod(2, command=m.OFPFC_DELETE_STRICT, table_id=250, priority=200,
                   cookie=COOKIE, cookie_mask=2**64 - 1,
                   match=[oxm.field("eth_type", 0x0800), oxm.field("ip_proto", 6)]),
        m.flow_mod(3, command=m.OFPFC_ADD, table_id=3, priority=9,
                   match=[oxm.field("eth_type", 0x0800), oxm.field("reg3", 42),
                          oxm.field("ipv4_src", 0x0A000000, 0xFFFFFF00)],
                   instructions=m.apply_actions(m.nx_controller2(64, 5, b"hi"),
                                                m.output(m.OFPP_CONTROLLER, 100))
                   + m.goto_table(4)),
        m.meter_mod(4, command=m.OFPMC_ADD, meter_id=9,
                    flags=m.OFPMF_PKTPS | m.OFPMF_BURST, bands=[(m.OFPMBT_DROP, 5000, 500)]))
    assert lines[0] == ("OFPT_FLOW_MOD (OF1.3) (xid=0x1): ADD table:250 priority=200,icmp6 "
                        "cookie:0x6f7673666c6f7700 actions=meter:9,"
                        "controller(max_len=128,id=28518)")
    assert lines[1] == ("OFPT_FLOW_MOD (OF1.3) (xid=0x2): DEL_STRICT table:250 priority=200,"
                        "tcp cookie:0x6f7673666c6f7700/0xffffffffffffffff actions=drop")
    assert lines[2] == ("OFPT_FLOW_MOD (OF1.3) (xid=0x3): ADD table:3 priority=9,ip,reg3=0x2a,"
                        "nw_src=10.0.0.0/24 actions=controller(max_len=64,id=5,"
                        "userdata=68.69),CONTROLLER:100,goto_table:4")
    assert lines[3:] == ["OFPT_METER_MOD (OF1.3) (xid=0x4): ADD meter=9 pktps burst bands=",
                         "type=drop rate=5000 burst_size=500"]


def packet_in_bytes(xid, cookie, table, fields, data, reason=m.OFPR_ACTION):
    match = oxm.encode_match(fields)
    body = struct.pack("!IHBBQ", m.OFP_NO_BUFFER, len(data), reason, table, cookie) + match
    body += b"\0\0" + data
    return m.HEADER.pack(4, m.OFPT_PACKET_IN, 8 + len(body), xid) + body


field_values = st.builds(
    lambda name, value: oxm.field(name, value % (1 << (8 * oxm._WIDTHS.get(name, 4)))),
    st.sampled_from(["in_port", "eth_type", "ip_proto", "ipv4_src", "reg3", "reg0", "ct_zone",
                     "tcp_dst", "metadata"]),
    st.integers(0, 2**64 - 1))


@given(st.lists(field_values, max_size=8), st.binary(max_size=300), st.integers(0, 2**64 - 1),
       st.integers(0, 254), st.integers(0, 2**32 - 1))
def test_packet_in_round_trip(fields, data, cookie, table, xid):
    message = m.decode(packet_in_bytes(xid, cookie, table, fields, data))
    assert isinstance(message, m.PacketIn)
    assert (message.xid, message.cookie, message.table_id, message.data) == (
        xid, cookie, table, data)
    assert message.match == fields


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
    message = m.decode(m._nicira(5, m.NXT_PACKET_IN2, body))
    assert isinstance(message, m.PacketIn)
    assert (message.table_id, message.cookie, message.total_len, message.userdata) == (
        250, COOKIE, 64, b"rule-7")
    assert message.field("reg3").int() == 42 and message.data == b"\x01\x02\x03"


def test_errors_are_readable():
    body = struct.pack("!HH", 12, 1) + b"\0" * 8
    message = m.decode(m.HEADER.pack(4, m.OFPT_ERROR, 8 + len(body), 77) + body)
    assert isinstance(message, m.Error)
    assert "METER_MOD_FAILED/METER_EXISTS" in str(message.error) and message.error.xid == 77


@pytest.mark.parametrize("data, fragment", [
    (b"\x04\x0a", "shorter than a header"),
    (m.HEADER.pack(4, 10, 20, 1) + b"\0" * 4, "header says 20 bytes"),
    (m.HEADER.pack(4, 10, 12, 1) + b"\0" * 4, "OFPT_PACKET_IN needs 16 bytes"),
    (m.HEADER.pack(4, 10, 32, 1) + b"\0" * 16 + struct.pack("!HH", 1, 99) + b"\0" * 4,
     "ofp_match of type 1, length 99"),
    (m.HEADER.pack(4, 10, 36, 1) + b"\0" * 16 + struct.pack("!HHI", 1, 12, 0x80000a10) +
     b"\0" * 4, "claims 16 bytes"),
])
def test_malformed_messages_raise_clear_errors(data, fragment):
    with pytest.raises(m.DecodeError, match=fragment):
        m.decode(data)


@pytest.mark.fuzz
@given(st.binary(max_size=200))
def test_fuzzed_messages_decode_or_raise_decode_error(data):
    message = m.HEADER.pack(4, data[0] % 32 if data else 10, 8 + len(data), 1) + data
    try:
        decoded = m.decode(message)
    except m.DecodeError:
        return
    assert isinstance(decoded, m.Message) and decoded.xid == 1


def test_the_connection_survives_a_malformed_message():
    """A peer we script plays the switch over a real unix socketpair."""
    async def scenario():
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        connection = OpenFlowConnection(reader, writer)
        switch_reader, switch_writer = await asyncio.open_unix_connection(sock=theirs)
        switch_writer.write(m.hello(1))
        await connection._handshake()
        switch_writer.write(m.HEADER.pack(4, m.OFPT_PACKET_IN, 12, 2) + b"\0" * 4)
        switch_writer.write(packet_in_bytes(3, COOKIE, 250, [oxm.field("reg3", 9)], b"x"))
        switch_writer.write(m.echo_request(4, b"ping"))
        event = await asyncio.wait_for(connection.events.get(), 5)
        assert isinstance(m.decode(await switch_reader.readexactly(16)), m.Hello)  # ours
        echo = m.decode(await switch_reader.readexactly(12))
        switch_writer.close()
        end = await asyncio.wait_for(connection.events.get(), 5)
        await connection.close()
        return connection, event, echo, end

    connection, event, echo, end = asyncio.run(scenario())
    assert connection.malformed == 1
    assert isinstance(event, m.PacketIn) and event.field("reg3").int() == 9
    assert isinstance(echo, m.EchoReply) and echo.data == b"ping" and echo.xid == 4
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

        def add(priority):
            return lambda xid: m.flow_mod(xid, command=m.OFPFC_ADD, table_id=250,
                                          priority=priority, cookie=COOKIE)

        async def scenario():
            connection = await OpenFlowConnection.open_unix(f"{lab.run_dir}/br0.mgmt")
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


def test_ovs_ofctl_reads_our_multipart_group_and_config_requests(tmp_path):
    lines = ofp_parse(
        tmp_path,
        m.flow_stats_request(1, 250, COOKIE, 2**64 - 1),
        m.meter_config_request(2, 250), m.meter_config_request(3),
        m.table_features_request(4), m.get_config_request(5),
        m.group_mod(6, command=m.OFPGC_DELETE, group_id=m.OFPG_ALL),
        m.meter_mod(7, command=m.OFPMC_DELETE, meter_id=m.OFPM_ALL, flags=0, bands=[]))
    # ovs-ofctl prints no cookie of a flow stats request: the test below reads flows by
    # cookie from OVS itself. OFPG_ALL is group 4294967292.
    assert lines == [
        "OFPST_FLOW request (OF1.3) (xid=0x1): table=250",
        "OFPST_METER_CONFIG request (OF1.3) (xid=0x2): meter=250",
        "OFPST_METER_CONFIG request (OF1.3) (xid=0x3): meter=all",
        "OFPST_TABLE_FEATURES request (OF1.3) (xid=0x4):",
        "OFPT_GET_CONFIG_REQUEST (OF1.3) (xid=0x5):",
        "OFPT_GROUP_MOD (OF1.3) (xid=0x6):", " DEL group_id=4294967292,type=all",
        "OFPT_METER_MOD (OF1.3) (xid=0x7): DEL meter=all bands="]


def test_flows_meters_and_table_names_read_back_from_open_vswitch(tmp_path):
    """What OVS answers to our multipart requests, decoded: flows added by ovs-ofctl (an
    Antrea logging flow with NXAST_CONTROLLER2 userdata, a plain controller action, a goto
    and a group), their meter, and table names set through table features."""
    lab = OvsLab(tmp_path / "ovs")
    try:
        lab.ofctl("add-meter", "meter=256,pktps,burst,band=type=drop,rate=5000,"
                               "burst_size=10000")
        lab.ofctl("add-group", "group_id=2,type=all,bucket=actions=resubmit(,15)")
        lab.ofctl("add-flow", "table=28,priority=200,cookie=0x1020000000001,"
                              "reg0=0x2400000/0xfe600000,actions=meter:256,"
                              "controller(reason=no_match,id=62373,userdata=01.01)")
        lab.ofctl("add-flow", f"table=250,priority=200,cookie={COOKIE},udp,"
                              "actions=controller(max_len=128,id=28518)")
        lab.ofctl("add-flow", "table=250,priority=100,cookie=0x99,tcp,actions=drop")
        lab.ofctl("add-flow", "table=12,priority=5,actions=group:2,goto_table:13")

        async def scenario():
            connection = await OpenFlowConnection.open_unix(f"{lab.run_dir}/br0.mgmt")
            try:
                everything = await connection.request_all(m.flow_stats_request)
                ours = await connection.request_all(
                    lambda xid: m.flow_stats_request(xid, 250, COOKIE, 2**64 - 1))
                meters = await connection.request_all(m.meter_config_request)
                features = await connection.request_all(m.table_features_request)
                xid = connection.next_xid()  # one xid for every part, as OVS wants
                for part in features:
                    connection.send(m.table_features_request(
                        xid, [t.renamed("Output") if t.table_id == 28 else t.raw
                              for t in part.tables], m.OFPMPF_MORE if part.more else 0))
                await connection.transact([])
                renamed = await connection.request_all(m.table_features_request)
                config = await connection.request(m.get_config_request)
                return everything, ours, meters, features, renamed, config
            finally:
                await connection.close()

        everything, ours, meters, features, renamed, config = asyncio.run(scenario())
        names = lab.ofctl("dump-flows", "--names", "table=28")
    finally:
        lab.stop()
    flows = {f.cookie: f for part in everything for f in part.flows}
    assert sorted(flows) == [0, 0x99, 0x1020000000001, COOKIE]
    output = flows[0x1020000000001]
    assert (output.table_id, output.priority) == (28, 200)
    assert output.match == [oxm.field("reg0", 0x2400000, 0xFE600000)]
    assert output.instructions == m.Instructions(
        256, (m.ControllerAction(62373, 0xFFFF, m.OFPR_NO_MATCH, b"\x01\x01"),))
    assert flows[COOKIE].instructions.actions == (m.ControllerAction(28518, 128,
                                                                     m.OFPR_ACTION),)
    assert flows[0x99].instructions == m.Instructions()  # actions=drop: no instruction
    goto = flows[0].instructions
    assert goto.goto_table == 13 and len(goto.actions) == 1
    assert isinstance(goto.actions[0], m.RawAction)  # group:2, kept as its bytes
    assert [(f.table_id, f.cookie) for part in ours for f in part.flows] == [(250, COOKIE)]
    assert meters[0].meters == {256: (m.OFPMF_PKTPS | m.OFPMF_BURST,
                                      ((m.OFPMBT_DROP, 5000, 10000),))}
    assert [part.more for part in features] == [True] * (len(features) - 1) + [False]
    assert sorted(t.table_id for part in features for t in part.tables) == list(range(254))
    assert {t.table_id: t.name for part in renamed for t in part.tables
            if t.table_id in (27, 28)} == {27: "", 28: "Output"}
    assert "table=Output" in names
    assert (config.flags, config.miss_send_len) == (0, 0)  # a new service connection's


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
        switch_writer.write(m.hello(1))
        await connection._handshake()
        await switch_reader.readexactly(16)  # our HELLO
        request = asyncio.create_task(connection.request_all(m.flow_stats_request))
        header = await switch_reader.readexactly(8)
        _, _, length, xid = m.HEADER.unpack(header)
        await switch_reader.readexactly(length - 8)
        switch_writer.write(reply(xid, 3, 1) + m.echo_request(99) + reply(xid, 4, 0))
        parts = await asyncio.wait_for(request, 5)
        switch_writer.close()
        await connection.close()
        return parts

    parts = asyncio.run(scenario())
    assert [(p.more, [f.table_id for f in p.flows]) for p in parts] == [
        (True, [3]), (False, [4])]
    assert parts[0].flows[0].cookie == 9 and parts[0].flows[0].instructions == m.Instructions()
