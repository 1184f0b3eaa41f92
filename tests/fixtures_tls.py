"""Fixtures that serve aiohttp apps over TLS on loopback, with throwaway certificates made by `openssl`."""

from __future__ import annotations

import secrets
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

OPENSSL = shutil.which("openssl")
SKIP_WITHOUT_OPENSSL = pytest.mark.skipif(
    OPENSSL is None, reason="the openssl command is not installed, and the TLS tests make their certificates with it"
)

LEAF_EXTENSIONS = """\
subjectAltName = {names}
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
"""


@dataclass(frozen=True)
class KeyPair:
    """A PEM certificate and its private key."""

    certificate: Path
    key: Path


@dataclass(frozen=True)
class TlsFiles:
    """A test CA, a CA that signed nothing served here, and two server certificates from the test CA."""

    ca: Path
    unrelated_ca: Path
    # Valid for IP:127.0.0.1 and DNS:localhost.
    loopback: KeyPair
    # Valid for DNS:wrong.example only, so it fails the host check on 127.0.0.1.
    wrong_host: KeyPair


ServeTls = Callable[[web.Application, KeyPair], Awaitable[str]]


def run_openssl(folder: Path, *arguments: str) -> None:
    """Run one `openssl` command in `folder`, failing with its output when it exits non-zero."""
    assert OPENSSL is not None
    result = subprocess.run([OPENSSL, *arguments], cwd=folder, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"openssl {' '.join(arguments)} failed:\n{result.stderr}"


def make_ca(folder: Path, name: str) -> KeyPair:
    """Make a self-signed P-256 CA certificate valid for two days."""
    run_openssl(
        folder, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN=mdr-connector test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )
    return KeyPair(folder / f"{name}.pem", folder / f"{name}.key")


def make_leaf(folder: Path, name: str, issuer: KeyPair, subject_names: str) -> KeyPair:
    """Make a P-256 server certificate for `subject_names` (an openssl subjectAltName value), signed by `issuer`."""
    extensions = folder / f"{name}.ext"
    extensions.write_text(LEAF_EXTENSIONS.format(names=subject_names), encoding="utf-8")
    run_openssl(
        folder, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
    )
    run_openssl(
        folder, "x509", "-req", "-in", f"{name}.csr", "-CA", str(issuer.certificate), "-CAkey", str(issuer.key),
        "-set_serial", str(secrets.randbits(63)), "-days", "2", "-extfile", extensions.name, "-out", f"{name}.pem",
    )
    return KeyPair(folder / f"{name}.pem", folder / f"{name}.key")


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """Certificates made once per test session in a temporary folder."""
    if OPENSSL is None:
        pytest.skip("the openssl command is not installed, and the TLS tests make their certificates with it")
    folder = tmp_path_factory.mktemp("tls")
    ca = make_ca(folder, "ca")
    unrelated = make_ca(folder, "unrelated-ca")
    return TlsFiles(
        ca=ca.certificate,
        unrelated_ca=unrelated.certificate,
        loopback=make_leaf(folder, "loopback", ca, "IP:127.0.0.1, DNS:localhost"),
        wrong_host=make_leaf(folder, "wrong-host", ca, "DNS:wrong.example"),
    )


@pytest.fixture
async def serve_tls() -> AsyncIterator[ServeTls]:
    """A function that serves an aiohttp app over TLS on 127.0.0.1 and returns its base URL.

    Every server it starts stops when the test ends.
    """
    async with AsyncExitStack() as stack:

        async def serve(app: web.Application, certificate: KeyPair) -> str:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(certificate.certificate, certificate.key)
            runner = web.AppRunner(app, handle_signals=False, access_log=None)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
            return f"https://127.0.0.1:{runner.addresses[0][1]}"

        yield serve
