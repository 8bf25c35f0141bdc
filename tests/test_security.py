"""TLS, mutual TLS, the inference token and the transport limits, from the server's config.

A throwaway CA and server/client certificates are made with `cryptography`; real servers are
started with them and reached with grpc.ssl_channel_credentials.
"""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.flowserve.v1 import flowserve_pb2 as pb
from protos.flowserve.v1 import flowserve_pb2_grpc as pb_grpc
from server.config import ConfigError, build_config
from server.transport import grpc_options
from tests.conftest import REPO_ROOT, ServerProcess

TIMEOUT = 20.0
TOKEN = "inference-token-0123456789"
Code = grpc.StatusCode


@dataclass(frozen=True)
class Pem:
    """A PEM certificate and its PEM private key."""

    cert: bytes
    key: bytes


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(subject: str, issuer: Pem | None, *, ca: bool = False, server: bool = False) -> Pem:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    issuer_cert = x509.load_pem_x509_certificate(issuer.cert) if issuer else None
    issuer_key = serialization.load_pem_private_key(issuer.key, password=None) if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_cert.subject if issuer_cert else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(issuer_key, hashes.SHA256())  # type: ignore[arg-type]
    return Pem(
        cert=cert.public_bytes(serialization.Encoding.PEM),
        key=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


@dataclass(frozen=True)
class Pki:
    ca: Pem
    server: Pem
    client: Pem
    other_ca: Pem
    stranger: Pem  # a client certificate from a CA the server does not trust


@pytest.fixture(scope="module")
def pki() -> Pki:
    ca = _issue("flowserve test CA", None, ca=True)
    other_ca = _issue("someone else's CA", None, ca=True)
    return Pki(
        ca=ca,
        server=_issue("localhost", ca, server=True),
        client=_issue("client", ca),
        other_ca=other_ca,
        stranger=_issue("stranger", other_ca),
    )


def _write(directory: Path, name: str, data: bytes) -> Path:
    path = directory / name
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def servers(
    pki: Pki, tiny_store: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, ServerProcess]]:
    """A TLS server and a mutual-TLS server that also requires the inference token."""
    directory = tmp_path_factory.mktemp("security")
    cert = _write(directory, "server.pem", pki.server.cert)
    key = _write(directory, "server.key", pki.server.key)
    client_ca = _write(directory, "ca.pem", pki.ca.cert)
    token = _write(directory, "token", f"{TOKEN}\n".encode())
    configs = {
        "tls": f'[security]\ntls_cert_file = "{cert}"\ntls_key_file = "{key}"\n',
        "mtls": (
            f'[security]\ntls_cert_file = "{cert}"\ntls_key_file = "{key}"\n'
            f'tls_client_ca_file = "{client_ca}"\ninference_token_file = "{token}"\n'
            "[limits]\nmax_tensor_bytes = 65536\n"
        ),
    }
    started: dict[str, ServerProcess] = {}
    try:
        for name, text in configs.items():
            config = _write(directory, f"{name}.toml", text.encode())
            args = ["--store", str(tiny_store), "--port", "0", "--metrics-port", "0"]
            args += ["--torch-threads", "1", "--config", str(config)]
            started[name] = ServerProcess(args, directory / f"{name}.log")
        for server in started.values():
            server.wait_for_line("flowserve ready")
        yield started
    finally:
        for server in started.values():
            server.stop()


def _channel(target: str, pki: Pki, client: Pem | None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert,
        private_key=client.key if client else None,
        certificate_chain=client.cert if client else None,
    )
    # The certificate names "localhost"; connect by IP and check the name we expect.
    return grpc.secure_channel(
        target, credentials, options=[("grpc.ssl_target_name_override", "localhost")]
    )


def _list_models(channel: grpc.Channel, token: str | None = None) -> pb.ListModelsResponse:
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    return pb_grpc.GeneratorStub(channel).ListModels(
        pb.ListModelsRequest(), metadata=metadata, timeout=TIMEOUT
    )


def _code(call: object) -> Code:
    with pytest.raises(grpc.RpcError) as error:
        call()  # type: ignore[operator]
    return error.value.code()  # type: ignore[no-any-return]


def test_tls_serves_encrypted_and_refuses_plaintext(
    servers: dict[str, ServerProcess], pki: Pki
) -> None:
    target = servers["tls"].target
    with _channel(target, pki, None) as channel:
        names = {model.name for model in _list_models(channel).models}
        assert {"toy2d", "toycond", "toyvp"} <= names
        sample = pb_grpc.GeneratorStub(channel).Sample(
            pb.SampleRequest(model="toy2d", num_samples=3, seed=1), timeout=TIMEOUT
        )
        assert len(sample.samples.data) == 3 * 2 * 4
    with grpc.insecure_channel(target) as plain:
        assert _code(lambda: _list_models(plain)) == Code.UNAVAILABLE
    # A client that does not trust the server's CA refuses it.
    untrusting = grpc.ssl_channel_credentials(root_certificates=pki.other_ca.cert)
    with grpc.secure_channel(
        target, untrusting, options=[("grpc.ssl_target_name_override", "localhost")]
    ) as channel:
        assert _code(lambda: _list_models(channel)) == Code.UNAVAILABLE


def test_mutual_tls_refuses_clients_without_a_trusted_certificate(
    servers: dict[str, ServerProcess], pki: Pki
) -> None:
    target = servers["mtls"].target
    with _channel(target, pki, pki.client) as channel:
        assert _list_models(channel, TOKEN).models
    with _channel(target, pki, None) as channel:
        assert _code(lambda: _list_models(channel, TOKEN)) == Code.UNAVAILABLE
    with _channel(target, pki, pki.stranger) as channel:
        assert _code(lambda: _list_models(channel, TOKEN)) == Code.UNAVAILABLE


def test_inference_token_guards_generator_but_not_health(
    servers: dict[str, ServerProcess], pki: Pki
) -> None:
    server = servers["mtls"]
    with _channel(server.target, pki, pki.client) as channel:
        assert _code(lambda: _list_models(channel)) == Code.UNAUTHENTICATED
        assert _code(lambda: _list_models(channel, "wrong-token-0000")) == Code.PERMISSION_DENIED
        assert _list_models(channel, TOKEN).models
        # The Open Inference Protocol too (an empty ServerLiveRequest is zero bytes).
        server_live = channel.unary_unary("/inference.GRPCInferenceService/ServerLive")
        assert _code(lambda: server_live(b"", timeout=TIMEOUT)) == Code.UNAUTHENTICATED
        token = (("authorization", f"Bearer {TOKEN}"),)
        assert server_live(b"", metadata=token, timeout=TIMEOUT) == b"\x08\x01"  # live: true
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=TIMEOUT
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    refused = server.metric(
        "flowserve_requests_total", method="ListModels", model="_unknown", code="UNAUTHENTICATED"
    )
    assert refused == 1


def test_message_size_limit_is_wired(servers: dict[str, ServerProcess], pki: Pki) -> None:
    # max_tensor_bytes = 64 KiB: messages are limited to 64 KiB + 4 MiB.
    too_big = pb.SampleRequest(
        model="toy2d",
        initial_noise=pb.Tensor(shape=[600_000, 2], data=bytes(4_800_000)),
    )
    with _channel(servers["mtls"].target, pki, pki.client) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        metadata = (("authorization", f"Bearer {TOKEN}"),)
        code = _code(lambda: stub.Sample(too_big, metadata=metadata, timeout=TIMEOUT))
    assert code == Code.RESOURCE_EXHAUSTED


def test_grpc_options_come_from_the_config() -> None:
    config = build_config(
        {"grpc": {"max_concurrent_streams": 7}, "limits": {"max_tensor_bytes": 1 << 20}}
    )
    options = dict(grpc_options(config))
    assert options["grpc.max_receive_message_length"] == (1 << 20) + 4 * (1 << 20)
    assert options["grpc.max_send_message_length"] == (1 << 20) + 4 * (1 << 20)
    assert options["grpc.http2.max_concurrent_streams"] == 7


@pytest.mark.parametrize(
    ("security", "message"),
    [
        ({"tls_cert_file": "server.pem"}, "go together"),
        ({"tls_key_file": "server.key"}, "go together"),
        ({"tls_client_ca_file": "ca.pem"}, "needs tls_cert_file"),
    ],
)
def test_incomplete_tls_settings_are_refused(security: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config({"security": security})


def test_unreadable_security_file_is_a_configuration_error(tmp_path: Path) -> None:
    config = tmp_path / "flowserve.toml"
    missing = tmp_path / "no-such-token"
    config.write_text(f'[security]\ninference_token_file = "{missing}"\n')
    (tmp_path / "store").mkdir()
    done = subprocess.run(
        [
            *(sys.executable, "-m", "server", "serve", "--store", str(tmp_path / "store")),
            *("--port", "0", "--metrics-port", "0", "--config", str(config)),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "security.inference_token_file" in done.stderr and str(missing) in done.stderr
