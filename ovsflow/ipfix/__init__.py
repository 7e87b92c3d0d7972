"""IPFIX (RFC 7011): information elements, templates, and a sans-IO codec."""
