"""AUTH (password, ACL user) and TLS (a self-signed CA made here, client certificates)
against real redis-server processes: the right credentials store and hit, wrong ones
are misses, never errors."""

import subprocess

import pytest
import torch

from lmcache_sgl.config import LMCacheConfig
from lmcache_sgl.storage.redis import RedisTier, TlsFiles
from redis_servers import redis_factory  # noqa: F401 (fixture)
from test_redis_tier import TIMEOUT, payload, put, read


def tier(url: str, **kwargs) -> RedisTier:
    return RedisTier(url, timeout_s=TIMEOUT, max_delay_s=0.5, **kwargs)


def works(url: str, **kwargs) -> bool:
    t = tier(url, **kwargs)
    try:
        put(t, 0)
        got = read(t, 0)
        return got is not None and torch.equal(got, payload(0))
    finally:
        t.close()


def test_password_and_acl_user(redis_factory):
    server = redis_factory("--requirepass", "pw-1", "--user", "alice", "on", ">alice-pw", "~lmcsgl:*", "+@all")
    base = f"127.0.0.1:{server.port}/0"
    assert works(f"redis://:pw-1@{base}")
    assert works(f"redis://alice:alice-pw@{base}")
    assert not works(f"redis://:wrong@{base}") and not works(f"redis://{base}")
    assert not works(f"redis://alice:alice-pw@{base}", key_prefix="other:")  # the ACL allows only lmcsgl:*
    assert "pw-1" not in tier(f"redis://:pw-1@{base}").describe()


def _openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@pytest.fixture
def pki(tmp_path):
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=lmcsgl-test-ca",
             cwd=tmp_path)
    for name in ("server", "client"):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=tmp_path)
        (tmp_path / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=tmp_path)
    return tmp_path


def test_tls_with_client_certificates(redis_factory, pki):
    server = redis_factory("--tls-cert-file", str(pki / "server.crt"), "--tls-key-file", str(pki / "server.key"),
                           "--tls-ca-cert-file", str(pki / "ca.crt"), "--tls-auth-clients", "yes", tls=True)
    full = TlsFiles(str(pki / "ca.crt"), str(pki / "client.crt"), str(pki / "client.key"))
    assert works(server.url, tls=full)
    assert not works(server.url, tls=TlsFiles(str(pki / "ca.crt")))  # no client certificate
    assert not works(server.url, tls=TlsFiles(None, full.cert, full.key))  # the system CAs do not know ours
    assert not works(server.url.replace("rediss", "redis"), tls=full)  # plain text to a TLS port


def test_tls_config_keys_reach_the_tier(redis_factory, pki):
    config = LMCacheConfig(remote_url="rediss://127.0.0.1:1/0", remote_tls_ca_file=str(pki / "ca.crt"),
                           remote_tls_cert_file=str(pki / "client.crt"), remote_tls_key_file=str(pki / "client.key"))
    assert config.validated() is config
    with pytest.raises(ValueError, match="remote_tls_key_file"):
        LMCacheConfig(remote_url="rediss://h", remote_tls_cert_file=str(pki / "client.crt")).validated()
    with pytest.raises(ValueError, match="needs a rediss"):
        LMCacheConfig(remote_url="redis://h", remote_tls_ca_file=str(pki / "ca.crt")).validated()
