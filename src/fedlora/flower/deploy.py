"""Flower processes on this machine: certificates, node keys, SuperLink, SuperNodes, ``flwr`` CLI calls.

Everything a launcher needs to run a real Flower 1.41 deployment on loopback (or Flower's simulation on a
local SuperLink) and to leave nothing behind:

* :func:`make_certificates`: a throwaway CA and a server certificate whose SAN lists the dialled hosts;
* :func:`make_node_keys`: a SuperNode's ECDSA P-384 key pair in OpenSSH format, what
  ``flower-supernode --auth-supernode-private-key`` loads and ``flwr supernode register`` accepts;
* :class:`Processes`: started processes by name and PID; stops each one's whole process tree (Flower's
  SuperLink runs its SuperExec and ServerApp in other process groups) on exit, error, SIGINT or SIGTERM;
* :func:`start_superlink` / :func:`start_supernode`: one HTTP(S) port each (in Flower 1.41 the Fleet,
  Control and Runtime APIs share the SuperLink's port); the SuperLink is waited for on ``/health``;
* :func:`register_node`, :func:`submit_run`, :func:`run_status`: the ``flwr`` CLI against our own
  ``FLWR_HOME`` (never the user's ``~/.flwr``), offline.

Failures raise :class:`DeployError` with one line naming the log to read. Nothing is printed.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("fedlora")

OFFLINE_ENV = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_DISABLE_UPDATE_CHECK": "1"}
_BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode and flwr live beside python


class DeployError(RuntimeError):
    """A Flower process or CLI call failed (one line)."""


@dataclass(frozen=True)
class Certificates:
    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKeys:
    private_key: Path
    public_key: Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _write_secret(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def make_certificates(folder: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
                      days: int = 30) -> Certificates:
    """A throwaway CA (``ca.crt``) and a server certificate (``server.pem``, ``server.key``) for ``hosts``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlora throwaway CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA384()))

    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))

    out = Certificates(folder / "ca.crt", folder / "server.pem", folder / "server.key")
    out.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_secret(out.server_key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
    return out


def make_node_keys(folder: Path, name: str) -> NodeKeys:
    """``<name>`` (private) and ``<name>.pub``: ECDSA P-384 in OpenSSH format, as ``ssh-keygen -t ecdsa -b 384``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    out = NodeKeys(Path(folder) / name, Path(folder) / f"{name}.pub")
    _write_secret(out.private_key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                     serialization.NoEncryption()))
    out.public_key.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                             serialization.PublicFormat.OpenSSH) + b"\n")
    return out


def write_flower_home(home: Path, name: str, address: str, *, root_certificates: Path | None = None) -> Path:
    """``home/config.toml`` with one default SuperLink connection ``name`` (TLS if ``root_certificates``)."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    security = (f'root-certificates = "{Path(root_certificates).resolve()}"' if root_certificates
                else "insecure = true")
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{security}\n')
    return home


def flower_env(home: Path | None = None) -> dict:
    env = dict(os.environ, **OFFLINE_ENV)
    env["PATH"] = f"{_BIN}{os.pathsep}{env.get('PATH', '')}"
    if home is not None:
        env["FLWR_HOME"] = str(Path(home).resolve())
    return env


class Processes:
    """Started processes by name; :meth:`stop_all` ends each one's process tree, by PID."""

    def __init__(self):
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self._tree: dict[int, float] = {}  # descendants seen (pid -> create time): stopped even if orphaned
        self._old_handlers: dict[int, object] = {}

    @property
    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs.items()}

    def __enter__(self) -> Processes:
        for sig in (signal.SIGTERM,):  # Ctrl-C arrives as KeyboardInterrupt; SIGTERM is made one too
            try:
                self._old_handlers[sig] = signal.signal(sig, _raise_interrupt)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.stop_all()
        finally:
            for sig, handler in self._old_handlers.items():
                signal.signal(sig, handler)

    def start(self, name: str, argv: list[str], log_path: Path, env: dict) -> subprocess.Popen:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)  # our Ctrl-C is ours to handle, not the children's
        self.procs[name], self.logs[name] = proc, log_path
        return proc

    def alive(self, name: str) -> bool:
        self.remember_children()
        return self.procs[name].poll() is None

    def remember_children(self) -> None:
        """Note every descendant now alive, so it is stopped even if its parent dies first."""
        import psutil

        for proc in self.procs.values():
            try:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    self._tree.setdefault(child.pid, child.create_time())
            except psutil.Error:
                continue

    def descendants_running(self, marker: str) -> list[int]:
        """PIDs of live (not zombie) descendants whose command line contains ``marker``."""
        import psutil

        found = []
        for proc in self.procs.values():
            try:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    if child.status() != psutil.STATUS_ZOMBIE and any(marker in a for a in child.cmdline()):
                        found.append(child.pid)
            except psutil.Error:
                continue
        return found

    def stop_all(self, timeout: float = 10.0) -> None:
        import psutil

        self.remember_children()
        targets = []
        for pid, created in {**self._tree, **{p.pid: None for p in self.procs.values()}}.items():
            try:
                proc = psutil.Process(pid)
                if created is None or proc.create_time() == created:  # not a reused PID
                    targets.append(proc)
            except psutil.Error:
                continue
        for proc in targets:
            try:
                proc.terminate()
            except psutil.Error:
                pass
        _, left = psutil.wait_procs(targets, timeout=timeout)
        for proc in left:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=timeout)
        for p in self.procs.values():  # reap our own children
            try:
                p.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _tail(path: Path, lines: int = 1) -> str:
    try:
        text = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return " ".join(" ".join(text[-lines:]).split())[-300:]


def start_superlink(procs: Processes, folder: Path, port: int, *, simulation: bool = False,
                    certificates: Certificates | None = None, supernode_auth: bool = False,
                    database: Path | None = None, home: Path | None = None, wait_s: float = 60.0) -> str:
    """Start a SuperLink on ``127.0.0.1:port`` and wait for its ``/health``; returns its address.

    ``home``: its ``FLWR_HOME`` (where it installs submitted apps); keep it out of the user's ``~/.flwr``.
    """
    argv = [str(_BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(port),
            "--disable-runtime-dependency-installation"]
    if certificates is None:
        argv.append("--insecure")
    else:
        argv += ["--ssl-ca-certfile", str(certificates.ca_cert), "--ssl-certfile", str(certificates.server_cert),
                 "--ssl-keyfile", str(certificates.server_key)]
    if simulation:
        argv.append("--simulation")
    if supernode_auth:
        argv.append("--enable-supernode-auth")
    if database is not None:
        argv += ["--database", str(database)]
    log_path = Path(folder) / "superlink.log"
    proc = procs.start("superlink", argv, log_path, flower_env(home))
    scheme = "http" if certificates is None else "https"
    context = None
    if certificates is not None:
        import ssl

        context = ssl.create_default_context(cafile=str(certificates.ca_cert))
    deadline = time.monotonic() + wait_s
    while True:
        if proc.poll() is not None:
            raise DeployError(f"the SuperLink exited with code {proc.returncode}: {_tail(log_path)} (log: {log_path})")
        try:
            with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/health", timeout=1, context=context) as r:
                if r.status == 200:
                    return f"127.0.0.1:{port}"
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise DeployError(f"the SuperLink did not answer on port {port} within {wait_s:g} s (log: {log_path})")
        time.sleep(0.3)


def _node_config(values: dict) -> str:
    parts = []
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"node config {key}: expected a number or a string, got {value!r}")
        parts.append(f"{key}={json.dumps(value)}" if isinstance(value, str) else f"{key}={value}")
    return " ".join(parts)


def start_supernode(procs: Processes, folder: Path, name: str, superlink: str, *, node_config: dict,
                    certificates: Certificates | None = None, keys: NodeKeys | None = None,
                    port: int | None = None, home: Path | None = None) -> subprocess.Popen:
    """Start a SuperNode ``name`` dialling ``superlink``; its ClientAppIo API on ``127.0.0.1:port``."""
    argv = [str(_BIN / "flower-supernode"), "--superlink", superlink, "--node-config", _node_config(node_config),
            "--host", "127.0.0.1", "--port", str(port or free_port())]
    argv += ["--insecure"] if certificates is None else ["--root-certificates", str(certificates.ca_cert)]
    if keys is not None:
        argv += ["--auth-supernode-private-key", str(keys.private_key)]
    return procs.start(name, argv, Path(folder) / f"{name}.log", flower_env(home))


def _flwr(home: Path, *args: str, timeout: float = 120.0) -> dict:
    """Run ``flwr ARGS --format json`` with ``FLWR_HOME=home``; its JSON answer, or a one-line DeployError."""
    argv = [str(_BIN / "flwr"), *args, "--format", "json"]
    try:
        done = subprocess.run(argv, env=flower_env(home), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DeployError(f"`flwr {args[0]}` did not answer within {timeout:g} s") from None
    text = done.stdout.strip()
    start = text.find("{")
    try:
        answer = json.loads(text[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        answer = {}
    if done.returncode != 0 or answer.get("success") is False:
        why = answer.get("error-message") or " ".join((done.stderr or text).split())[-300:]
        raise DeployError(f"`flwr {' '.join(args[:2])}` failed: {why}")
    return answer


def register_node(home: Path, connection: str, public_key: Path) -> int:
    """Register a SuperNode's public key with the SuperLink (CLI-managed authentication); its node id."""
    return int(_flwr(home, "supernode", "register", str(public_key), connection)["node-id"])


def submit_run(home: Path, app_dir: Path, connection: str, *, run_config: dict | None = None,
               federation_config: dict | None = None) -> int:
    """``flwr run APP_DIR CONNECTION``; the run id."""
    args = ["run", str(app_dir), connection]
    if run_config:
        args += ["--run-config", " ".join(f"{k}={_toml(v)}" for k, v in run_config.items())]
    if federation_config:
        args += ["--federation-config", " ".join(f"{k}={_toml(v)}" for k, v in federation_config.items())]
    return int(_flwr(home, *args)["run-id"])


def run_status(home: Path, connection: str, run_id: int) -> str:
    """Flower's status of a run, e.g. ``running`` or ``finished:completed``."""
    runs = _flwr(home, "ls", connection, "--run-id", str(run_id)).get("runs", [])
    return str(runs[0].get("status", "")) if runs else ""


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))
