"""A small world for ovsflow, used by the demo and the tests: network namespaces, Open vSwitch
with the userspace datapath in a private directory, and traffic of every protocol."""
