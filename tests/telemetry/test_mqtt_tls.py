"""The agent's MQTT connection over TLS with a per-device certificate, against a real mosquitto that requires
client certificates and takes the certificate's CN as the username (the production shape in ARCHITECTURE.md)."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.telemetry.mqtt import AgentMqtt, MqttConfigError, MqttSettings, TlsSettings
from agent.telemetry.outbox import Outbox
from tests.services.mqtt import MosquittoBroker, find_mosquitto, wait_until
from tests.services.required import unavailable
from tests.telemetry.agent_harness import window_frame

pytestmark = pytest.mark.integration


def _cert(subject: str, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None, *, ca: bool = False,
          san: str | None = None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = issuer if issuer else (name, key)
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    crt, pem = path.with_suffix(".crt"), path.with_suffix(".key")
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return crt, pem


class TlsMosquitto(MosquittoBroker):
    """mosquitto with one TLS listener: client certificates required, CN used as the username."""

    def __init__(self, binary: str, workdir: Path, ca: Path, cert: Path, key: Path) -> None:
        self.tls = (ca, cert, key)
        super().__init__(binary, workdir)

    def _write_config(self) -> None:
        ca, cert, key = self.tls
        lines = [f"listener {self.port} {self.host}", f"cafile {ca}", f"certfile {cert}", f"keyfile {key}",
                 "require_certificate true", "use_identity_as_username true", "allow_anonymous false",
                 "persistence false", "log_type error", "log_type warning", "log_type notice"]
        if os.geteuid() == 0:
            lines.append("user root")
        self.conf.write_text("\n".join(lines) + "\n")


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    ca_cert, ca_key = _cert("fleet-test-ca", None, ca=True)
    ca_name = ca_cert.subject
    out = {}
    out["ca"], _ = _write(tmp_path / "ca", ca_cert, ca_key)
    out["server_crt"], out["server_key"] = _write(tmp_path / "server", *_cert("localhost", (ca_name, ca_key),
                                                                                 san="localhost"))
    out["dev_crt"], out["dev_key"] = _write(tmp_path / "dev", *_cert("tls-dev-1", (ca_name, ca_key)))
    rogue_cert, rogue_key = _cert("rogue-ca", None, ca=True)
    out["rogue_crt"], out["rogue_key"] = _write(tmp_path / "rogue", *_cert("tls-dev-1", (rogue_cert.subject,
                                                                                        rogue_key)))
    return out


def _settings(broker: MosquittoBroker, tls: TlsSettings) -> MqttSettings:
    return MqttSettings(host="localhost", port=broker.port, device_id="tls-dev-1", tls=tls, reconnect_min_s=0.05,
                        reconnect_max_s=0.3, heartbeat_s=None, connect_timeout_s=3.0, probe_timeout_s=1.0)


def test_device_certificate_connects_and_publishes_over_tls(pki: dict[str, Path], tmp_path: Path) -> None:
    binary = find_mosquitto()
    if binary is None:
        unavailable("mosquitto is not installed (apt-get install mosquitto)")
    work = tmp_path / "broker"
    work.mkdir()
    broker = TlsMosquitto(binary, work, pki["ca"], pki["server_crt"], pki["server_key"])
    broker.start()
    outbox = Outbox(tmp_path / "outbox.sqlite").open()
    good = AgentMqtt(_settings(broker, TlsSettings(pki["ca"], pki["dev_crt"], pki["dev_key"])), outbox)
    try:
        good.start()
        wait_until(lambda: good.stats().connected, 15, what="the TLS connection with the device certificate")
        outbox.append("drift", lambda seq: window_frame("tls-dev-1", seq, time.time()))
        wait_until(lambda: good.stats().published >= 1, 10, what="a publish over TLS")
    finally:
        good.stop()
        outbox.close()
    # A certificate from another CA is refused by the broker: the device never gets connected.
    outbox2 = Outbox(tmp_path / "outbox2.sqlite").open()
    rogue = AgentMqtt(_settings(broker, TlsSettings(pki["ca"], pki["rogue_crt"], pki["rogue_key"])), outbox2)
    try:
        rogue.start()
        time.sleep(2.0)
        assert not rogue.stats().connected
    finally:
        rogue.stop()
        outbox2.close()
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)


def test_unreadable_device_key_is_a_config_error(pki: dict[str, Path], tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.sqlite").open()
    try:
        bad = AgentMqtt(MqttSettings(host="localhost", device_id="tls-dev-1",
                                     tls=TlsSettings(pki["ca"], pki["dev_crt"], tmp_path / "missing.key")), outbox)
        with pytest.raises(MqttConfigError):
            bad.start()
    finally:
        outbox.close()
