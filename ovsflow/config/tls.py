"""The client side of the TLS session with a collector, built the same way to validate a
configuration and to connect."""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from ..protocol_list import quote_value
from .model import ConfigError, TlsSettings
from .values import is_host

# ssl is imported when a TLS file needs it: `ovsflow conntrack` loads a configuration on
# every run and pays for each module it imports (tests/test_cli_imports.py).
if TYPE_CHECKING:
    import ssl


def is_ip_or_host(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return is_host(text)


def client_tls_context(tls: TlsSettings) -> ssl.SSLContext:
    """The client side of the TLS session with the collector. Validation builds one and
    throws it away, the agent builds the one it connects with: both by this function, so
    that a configuration that loads is one the agent can use. Raises ConfigError naming
    the key and the file."""
    files = [("caFile", tls.ca_file), ("certFile", tls.cert_file), ("keyFile", tls.key_file)]
    unreadable = []
    for key, path in files:
        if path is None:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as err:
            unreadable.append(f"ipfix.tls.{key}: cannot read {quote_value(path)}: "
                              f"{err.strerror}")
    if unreadable:
        raise ConfigError(unreadable)
    import ssl

    try:
        context = ssl.create_default_context(cafile=tls.ca_file)
    except ssl.SSLError as err:
        raise ConfigError([f"ipfix.tls.caFile: {quote_value(tls.ca_file)} holds no PEM CA "
                           f"certificate ({err.reason or err})"]) from None
    if tls.cert_file:
        key_key = "keyFile" if tls.key_file else "certFile"

        def refuse_password() -> bytes:
            # Without a callback OpenSSL would prompt on the terminal: a hang, in a pod.
            raise ConfigError([f"ipfix.tls.{key_key}: the private key is encrypted; "
                               "ovsflow reads only unencrypted keys"])

        try:
            context.load_cert_chain(tls.cert_file, tls.key_file, password=refuse_password)
        except ssl.SSLError as err:
            why = ("the key does not belong to the certificate"
                   if err.reason == "KEY_VALUES_MISMATCH" else
                   "expected a PEM certificate and an unencrypted PEM private key")
            keys = "certFile, keyFile" if tls.key_file else "certFile"
            raise ConfigError([f"ipfix.tls.{keys}: cannot load "
                               f"{quote_value(tls.cert_file)} with "
                               f"{quote_value(tls.key_file or tls.cert_file)}: {why} "
                               f"({err.reason or err})"]) from None
    if tls.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
