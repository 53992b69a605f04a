"""TLS and mutual TLS with a throwaway CA made by the ``openssl`` CLI for this test run."""

from __future__ import annotations

import http.client
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_harness import ServerThread, make_config, serving
from tritonclient.utils import InferenceServerException

from pruneserve.server.client import InferenceClient
from pruneserve.server.errors import ConfigError

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="needs the openssl command to make certificates"
)


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate from another CA
    rogue_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(d: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip


def _leaf(d: Path, name: str, ca: str, extensions: str) -> None:
    (d / f"{name}.ext").write_text(extensions)
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
        "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "rogue-ca")
    _leaf(d, "server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    _leaf(d, "client", "ca", "extendedKeyUsage=clientAuth\n")
    _leaf(d, "rogue", "rogue-ca", "extendedKeyUsage=clientAuth\n")
    return Pki(
        d / "ca.pem",
        d / "server.pem",
        d / "server.key",
        d / "client.pem",
        d / "client.key",
        d / "rogue.pem",
        d / "rogue.key",
    )


def _text() -> tc.InferInput:
    t = tc.InferInput("text", [1, 1], "BYTES")
    t.set_data_from_numpy(np.array([[b"hello world"]], dtype=object))
    return t


@pytest.fixture(scope="module")
def tls_server(pki: Pki, embedding_artifact: Path) -> Iterator[ServerThread]:
    config = make_config([embedding_artifact], tls_cert=str(pki.server_cert), tls_key=str(pki.server_key))
    with serving(config) as srv:
        yield srv


@pytest.fixture(scope="module")
def mtls_server(pki: Pki, embedding_artifact: Path) -> Iterator[ServerThread]:
    config = make_config(
        [embedding_artifact], tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), tls_client_ca=str(pki.ca)
    )
    with serving(config) as srv:
        yield srv


def test_tls_serves_clients_that_trust_the_ca(tls_server: ServerThread, pki: Pki) -> None:
    client = tc.InferenceServerClient(tls_server.url, ssl=True, root_certificates=str(pki.ca))
    assert client.infer("tiny-embed", [_text()]).as_numpy("embedding").shape == (1, 8)
    client.close()
    with InferenceClient(tls_server.url, tls_ca=pki.ca) as ours:
        assert ours.server_ready()


def test_tls_refuses_plaintext_and_untrusting_clients(tls_server: ServerThread, pki: Pki) -> None:
    plaintext = tc.InferenceServerClient(tls_server.url)
    with pytest.raises(InferenceServerException) as err:
        plaintext.is_server_live(client_timeout=5)
    assert err.value.status() == "StatusCode.UNAVAILABLE"
    plaintext.close()
    with (
        grpc.secure_channel(
            tls_server.url,
            grpc.ssl_channel_credentials(root_certificates=(pki.ca.parent / "rogue-ca.pem").read_bytes()),
        ) as channel,
        pytest.raises(grpc.FutureTimeoutError),
    ):
        grpc.channel_ready_future(channel).result(timeout=3)  # the handshake fails: wrong CA


def test_mutual_tls_requires_a_client_certificate_from_the_ca(mtls_server: ServerThread, pki: Pki) -> None:
    good = tc.InferenceServerClient(
        mtls_server.url,
        ssl=True,
        root_certificates=str(pki.ca),
        private_key=str(pki.client_key),
        certificate_chain=str(pki.client_cert),
    )
    assert good.infer("tiny-embed", [_text()]).as_numpy("embedding").shape == (1, 8)
    good.close()
    anonymous = tc.InferenceServerClient(mtls_server.url, ssl=True, root_certificates=str(pki.ca))
    with pytest.raises(InferenceServerException) as err:
        anonymous.is_server_live(client_timeout=5)
    assert err.value.status() == "StatusCode.UNAVAILABLE"
    anonymous.close()
    with InferenceClient(
        mtls_server.url, tls_ca=pki.ca, tls_cert=pki.rogue_cert, tls_key=pki.rogue_key, timeout=5
    ) as rogue:
        with pytest.raises(grpc.RpcError) as rpc_err:
            rogue.server_live()
        assert rpc_err.value.code() is grpc.StatusCode.UNAVAILABLE
    with InferenceClient(mtls_server.url, tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key) as ours:
        assert ours.infer_text("tiny-embed", ["hello"])["embedding"].shape == (1, 8)


def test_tls_config_errors_name_the_problem(pki: Pki, embedding_artifact: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tls_cert and tls_key must be given together"):
        make_config([embedding_artifact], tls_cert=str(pki.server_cert))
    with pytest.raises(ConfigError, match=r"tls_client_ca .* needs tls_cert"):
        make_config([embedding_artifact], tls_client_ca=str(pki.ca))
    bad = tmp_path / "garbage.pem"
    bad.write_text("not a certificate")
    config = make_config([embedding_artifact], tls_cert=str(bad), tls_key=str(pki.server_key))
    with pytest.raises(ConfigError, match=r"tls_cert .* is not a PEM certificate"), serving(config):
        pass


# -- HTTP: the same PEM files, the same guarantees ------------------------------------------
def _https_ready(port: int, context: ssl.SSLContext | None, scheme: str = "https") -> int:
    with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/v2/health/ready", timeout=10, context=context) as resp:
        return resp.status


def _client_context(pki: Pki, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


def test_http_tls_serves_trusting_clients_and_refuses_plaintext(tls_server: ServerThread, pki: Pki) -> None:
    port = tls_server.server.http_port
    assert port and _https_ready(port, _client_context(pki)) == 200
    with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
        _https_ready(port, None, scheme="http")  # plaintext to a TLS port: no HTTP answer
    with pytest.raises((urllib.error.URLError, ssl.SSLError)):
        _https_ready(port, ssl.create_default_context(cafile=str(pki.ca.parent / "rogue-ca.pem")))


def test_http_mutual_tls_requires_a_client_certificate_from_the_ca(mtls_server: ServerThread, pki: Pki) -> None:
    port = mtls_server.server.http_port
    assert port and _https_ready(port, _client_context(pki, pki.client_cert, pki.client_key)) == 200
    for context in (_client_context(pki), _client_context(pki, pki.rogue_cert, pki.rogue_key)):
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            _https_ready(port, context)
