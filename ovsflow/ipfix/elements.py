"""Information elements: the IANA ones ovsflow sends or commonly receives, the reverse
elements of RFC 5103 (PEN 29305) and Antrea's (PEN 56506, as registered by go-ipfix).

An element is (enterprise number, element id); its abstract data type decides its encoding
(RFC 7011 §6) and how the collector prints it.
"""

from __future__ import annotations

from dataclasses import dataclass

IANA = 0
REVERSE_PEN = 29305  # RFC 5103 bidirectional flow export
ANTREA_PEN = 56506

VARIABLE_LENGTH = 65535

# abstract data type -> default (full-size) encoded length, RFC 7012 §3.1
DATA_TYPES: dict[str, int] = {
    "octetArray": VARIABLE_LENGTH, "unsigned8": 1, "unsigned16": 2, "unsigned32": 4,
    "unsigned64": 8, "signed8": 1, "signed16": 2, "signed32": 4, "signed64": 8,
    "float32": 4, "float64": 8, "boolean": 1, "macAddress": 6, "string": VARIABLE_LENGTH,
    "dateTimeSeconds": 4, "dateTimeMilliseconds": 8, "dateTimeMicroseconds": 8,
    "dateTimeNanoseconds": 8, "ipv4Address": 4, "ipv6Address": 16,
}


@dataclass(frozen=True)
class InformationElement:
    name: str
    element_id: int
    data_type: str
    enterprise: int = IANA

    @property
    def default_length(self) -> int:
        return DATA_TYPES[self.data_type]


_IANA_ELEMENTS = [
    (1, "octetDeltaCount", "unsigned64"), (2, "packetDeltaCount", "unsigned64"),
    (3, "deltaFlowCount", "unsigned64"), (4, "protocolIdentifier", "unsigned8"),
    (5, "ipClassOfService", "unsigned8"), (6, "tcpControlBits", "unsigned16"),
    (7, "sourceTransportPort", "unsigned16"), (8, "sourceIPv4Address", "ipv4Address"),
    (9, "sourceIPv4PrefixLength", "unsigned8"), (10, "ingressInterface", "unsigned32"),
    (11, "destinationTransportPort", "unsigned16"),
    (12, "destinationIPv4Address", "ipv4Address"),
    (13, "destinationIPv4PrefixLength", "unsigned8"), (14, "egressInterface", "unsigned32"),
    (15, "ipNextHopIPv4Address", "ipv4Address"), (16, "bgpSourceAsNumber", "unsigned32"),
    (17, "bgpDestinationAsNumber", "unsigned32"),
    (18, "bgpNextHopIPv4Address", "ipv4Address"), (21, "flowEndSysUpTime", "unsigned32"),
    (22, "flowStartSysUpTime", "unsigned32"), (27, "sourceIPv6Address", "ipv6Address"),
    (28, "destinationIPv6Address", "ipv6Address"),
    (29, "sourceIPv6PrefixLength", "unsigned8"),
    (30, "destinationIPv6PrefixLength", "unsigned8"), (31, "flowLabelIPv6", "unsigned32"),
    (32, "icmpTypeCodeIPv4", "unsigned16"), (40, "exportedOctetTotalCount", "unsigned64"),
    (41, "exportedMessageTotalCount", "unsigned64"),
    (42, "exportedFlowRecordTotalCount", "unsigned64"),
    (56, "sourceMacAddress", "macAddress"), (58, "vlanId", "unsigned16"),
    (60, "ipVersion", "unsigned8"), (61, "flowDirection", "unsigned8"),
    (80, "destinationMacAddress", "macAddress"), (82, "interfaceName", "string"),
    (83, "interfaceDescription", "string"), (85, "octetTotalCount", "unsigned64"),
    (86, "packetTotalCount", "unsigned64"), (130, "exporterIPv4Address", "ipv4Address"),
    (131, "exporterIPv6Address", "ipv6Address"), (136, "flowEndReason", "unsigned8"),
    (138, "observationPointId", "unsigned64"), (139, "icmpTypeCodeIPv6", "unsigned16"),
    (143, "meteringProcessId", "unsigned32"), (144, "exportingProcessId", "unsigned32"),
    (148, "flowId", "unsigned64"),
    (149, "observationDomainId", "unsigned32"), (150, "flowStartSeconds", "dateTimeSeconds"),
    (151, "flowEndSeconds", "dateTimeSeconds"),
    (152, "flowStartMilliseconds", "dateTimeMilliseconds"),
    (153, "flowEndMilliseconds", "dateTimeMilliseconds"),
    (154, "flowStartMicroseconds", "dateTimeMicroseconds"),
    (155, "flowEndMicroseconds", "dateTimeMicroseconds"),
    (156, "flowStartNanoseconds", "dateTimeNanoseconds"),
    (157, "flowEndNanoseconds", "dateTimeNanoseconds"),
    (160, "systemInitTimeMilliseconds", "dateTimeMilliseconds"),
    (161, "flowDurationMilliseconds", "unsigned32"),
    (164, "ignoredPacketTotalCount", "unsigned64"), (166, "notSentFlowTotalCount", "unsigned64"),
    (176, "icmpTypeIPv4", "unsigned8"), (177, "icmpCodeIPv4", "unsigned8"),
    (178, "icmpTypeIPv6", "unsigned8"), (179, "icmpCodeIPv6", "unsigned8"),
    (210, "paddingOctets", "octetArray"), (233, "firewallEvent", "unsigned8"),
    (239, "biflowDirection", "unsigned8"), (256, "ethernetType", "unsigned16"),
    (300, "observationDomainName", "string"),
    (323, "observationTimeMilliseconds", "dateTimeMilliseconds"),
    (346, "privateEnterpriseNumber", "unsigned32"),
    (407, "ignoredDataRecordTotalCount", "unsigned64"),
    # the deny path's totals and sampling (docs/ipfix.md, template 270 and the deny records)
    (311, "samplingProbability", "float64"), (352, "layer2OctetDeltaCount", "unsigned64"),
    (353, "layer2OctetTotalCount", "unsigned64"), (361, "portRangeStart", "unsigned16"),
    (362, "portRangeEnd", "unsigned16"),
]

_ANTREA_ELEMENTS = [
    (100, "sourcePodNamespace", "string"), (101, "sourcePodName", "string"),
    (102, "destinationPodNamespace", "string"), (103, "destinationPodName", "string"),
    (104, "sourceNodeName", "string"), (105, "destinationNodeName", "string"),
    (106, "destinationClusterIPv4", "ipv4Address"),
    (107, "destinationClusterIPv6", "ipv6Address"),
    (108, "destinationServicePort", "unsigned16"),
    (109, "destinationServicePortName", "string"),
    (110, "ingressNetworkPolicyName", "string"),
    (111, "ingressNetworkPolicyNamespace", "string"),
    (112, "egressNetworkPolicyName", "string"), (113, "egressNetworkPolicyNamespace", "string"),
    (114, "ingressNetworkPolicyUID", "string"), (115, "ingressNetworkPolicyType", "unsigned8"),
    (116, "ingressNetworkPolicyRulePriority", "signed32"),
    (117, "egressNetworkPolicyUID", "string"), (118, "egressNetworkPolicyType", "unsigned8"),
    (119, "egressNetworkPolicyRulePriority", "signed32"),
    (136, "tcpState", "string"), (137, "flowType", "unsigned8"),
    (138, "tcpStatePrevList", "string"), (139, "ingressNetworkPolicyRuleAction", "unsigned8"),
    (140, "egressNetworkPolicyRuleAction", "unsigned8"),
    (141, "ingressNetworkPolicyRuleName", "string"),
    (142, "egressNetworkPolicyRuleName", "string"), (143, "sourcePodLabels", "string"),
    (144, "destinationPodLabels", "string"), (145, "throughput", "unsigned64"),
    (146, "reverseThroughput", "unsigned64"),
]

# RFC 5103 §6.1: elements that describe the export, not the flow, have no reverse form
# (the names go-ipfix's registry.go lists; those in the table above).
_NOT_REVERSIBLE = {
    "biflowDirection", "exportedMessageTotalCount", "exportedOctetTotalCount",
    "exportedFlowRecordTotalCount", "exporterIPv4Address", "exporterIPv6Address", "flowId",
    "ignoredPacketTotalCount", "notSentFlowTotalCount", "observationDomainId", "paddingOctets",
}

_BY_KEY: dict[tuple[int, int], InformationElement] = {}
_BY_NAME: dict[str, InformationElement] = {}


def _register(element: InformationElement) -> None:
    _BY_KEY[element.enterprise, element.element_id] = element
    _BY_NAME[element.name] = element


for _id, _name, _type in _IANA_ELEMENTS:
    _register(InformationElement(_name, _id, _type))
    if _name in _NOT_REVERSIBLE:
        continue
    # RFC 5103: the reverse element has the same id under PEN 29305, named reverse<Name>.
    _register(InformationElement("reverse" + _name[0].upper() + _name[1:], _id, _type,
                                 REVERSE_PEN))
for _id, _name, _type in _ANTREA_ELEMENTS:
    _register(InformationElement(_name, _id, _type, ANTREA_PEN))


def element(name: str) -> InformationElement:
    """The element of that name; KeyError names it when it is not in the registry."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown information element {name!r}") from None


def lookup(enterprise: int, element_id: int) -> InformationElement:
    """The registered element, or an octetArray stand-in named after its numbers so that a
    collector still shows what it could not interpret."""
    found = _BY_KEY.get((enterprise, element_id))
    if found is not None:
        return found
    name = f"ie{element_id}" if enterprise == IANA else f"ie{enterprise}.{element_id}"
    return InformationElement(name, element_id, "octetArray", enterprise)
