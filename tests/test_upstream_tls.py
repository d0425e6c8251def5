"""The real service is https: the upstream client verifies its certificate, with either client."""

import ssl
import subprocess

import pytest
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


@pytest.fixture
def tls_fake_url(io_loop, fake, certificate):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*map(str, certificate))
    sock, port = bind_unused_port()
    server = HTTPServer(fake.make_app(), ssl_options=context)
    server.add_sockets([sock])
    yield "https://127.0.0.1:%d" % port
    server.stop()


@pytest.mark.parametrize("client", ["pooled", "curl", "simple"])
@pytest.mark.gen_test
async def test_trusted_certificate_works(make_proxy, fake, tls_fake_url, certificate, client):
    proxy = make_proxy(upstream_url=tls_fake_url, upstream_ca_certs=str(certificate[0]), upstream_client=client)
    task_uuid = await proxy.submit()
    assert task_uuid in fake.tasks


@pytest.mark.parametrize("client", ["pooled", "curl", "simple"])
@pytest.mark.gen_test
async def test_untrusted_certificate_is_refused(make_proxy, fake, tls_fake_url, client):
    proxy = make_proxy(upstream_url=tls_fake_url, upstream_client=client)  # system CAs only
    code, body = await proxy.json("/v1/chat/completions", "POST", {"model": "zimage-turbo", "prompt": "x"})
    assert code == 502
    assert body["error"]["code"] == "upstream_unavailable"
    assert not fake.tasks
