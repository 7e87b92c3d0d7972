"""ovsflow: IPFIX flow records from Open vSwitch conntrack and denied packets."""

__version__ = "0.1.0"
