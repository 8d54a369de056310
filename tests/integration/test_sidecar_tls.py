"""The sidecar over TLS and mTLS (certificates made here: a CA, a server and a client, and a
second, untrusted CA with its own client certificate).

``cryptography`` is in the dev extra and the lock: these tests run in CI, never skip. Refused:
a plaintext client, a client that trusts another CA (it cannot verify the server), and under
mTLS a client without a certificate or with one from the untrusted CA; nothing they send is
stored.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from sidecar._client import SidecarClient
from sidecar._server import Sidecar
from tests.integration.conftest import build_incident


def _certs(tmp_path: Path) -> dict[str, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)
    out: dict[str, Path] = {}

    def write(name: str, key: Any, cert: Any) -> None:
        out[f"{name}_key"] = tmp_path / f"{name}.key"
        out[f"{name}_key"].write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        out[f"{name}_cert"] = tmp_path / f"{name}.pem"
        out[f"{name}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def make(cn: str, issuer: Any, issuer_key: Any, *, ca: bool) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        b = (x509.CertificateBuilder().subject_name(subject)
             .issuer_name(issuer or subject).public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(minutes=5))
             .not_valid_after(now + dt.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            import ipaddress

            b = b.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
        return key, b.sign(issuer_key or key, hashes.SHA256())

    ca_key, ca_cert = make("forensics-test-ca", None, None, ca=True)
    write("ca", ca_key, ca_cert)
    for name in ("server", "client"):
        key, cert = make(name, ca_cert.subject, ca_key, ca=False)
        write(name, key, cert)
    rogue_key, rogue_cert = make("forensics-rogue-ca", None, None, ca=True)
    write("rogue_ca", rogue_key, rogue_cert)
    key, cert = make("client", rogue_cert.subject, rogue_key, ca=False)   # same CN, wrong CA
    write("rogue_client", key, cert)
    return out


def _refused(addr: str, incident_id: str, **client: Any) -> grpc.StatusCode:
    """Try to upload with these client credentials; the status the refusal came with."""
    with SidecarClient(addr, timeout_s=3, **client) as c, pytest.raises(grpc.RpcError) as e:
        c.upload(incident_id, build_incident(incident_id))
    return e.value.code()


@pytest.mark.parametrize("mtls", [False, True])
def test_tls_and_mtls(serve: Callable[..., tuple[Sidecar, str]], tmp_path: Path,
                      mtls: bool) -> None:
    certs = _certs(tmp_path)
    tls: dict[str, Any] = {"cert_file": str(certs["server_cert"]),
                           "key_file": str(certs["server_key"])}
    if mtls:
        tls.update(client_ca_file=str(certs["ca_cert"]), require_client_auth=True)
    _, addr = serve(grpc={"tls": tls})
    ca = certs["ca_cert"].read_bytes()
    client_creds = {"private_key": certs["client_key"].read_bytes(),
                    "certificate_chain": certs["client_cert"].read_bytes()}
    good = {"root_certificates": ca, **(client_creds if mtls else {})}
    refusals = {"plaintext": _refused(addr, "inc-plain"),
                "wrong CA": _refused(addr, "inc-wrong-ca",
                                     root_certificates=certs["rogue_ca_cert"].read_bytes(),
                                     **(client_creds if mtls else {}))}
    if mtls:
        refusals["no client certificate"] = _refused(addr, "inc-no-cert", root_certificates=ca)
        refusals["client certificate from another CA"] = _refused(
            addr, "inc-rogue-cert", root_certificates=ca,
            private_key=certs["rogue_client_key"].read_bytes(),
            certificate_chain=certs["rogue_client_cert"].read_bytes())
    assert refusals == dict.fromkeys(refusals, grpc.StatusCode.UNAVAILABLE)  # handshake failed
    with SidecarClient(addr, **good) as c:
        assert c.upload("inc-1", build_incident("inc-1")).created
        assert [i.id for i in c.list().incidents] == ["inc-1"]   # nothing refused was stored
