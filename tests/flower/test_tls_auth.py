"""The deployment's infrastructure (``fedlora.flower.deploy``) against Flower itself, on loopback.

Certificates chain to the throwaway CA and name the dialled hosts; node keys are what Flower loads; every
process (and every descendant, even one orphaned by its parent's death) is stopped by PID. End to end with
a tiny Flower app: TLS on, two registered SuperNodes answer, a SuperNode whose key is not registered is
refused and never joins, and a client that does not speak TLS gets nothing from the SuperLink.
"""

from __future__ import annotations

import json
import stat
import sys
import time
from pathlib import Path

import pytest

psutil = pytest.importorskip("psutil")
pytest.importorskip("flwr")

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

from fedlora.flower import deploy as dp  # noqa: E402

HELLO = Path(__file__).parent / "hello_app"


def test_the_server_certificate_chains_to_the_ca_and_names_the_hosts(tmp_path):
    certs = dp.make_certificates(tmp_path, hosts=("127.0.0.1", "localhost", "fl.example.org"))
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    assert cert.issuer == ca.subject
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "fl.example.org"]
    key = serialization.load_pem_private_key(certs.server_key.read_bytes(), None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    assert stat.S_IMODE(certs.server_key.stat().st_mode) == 0o600


def test_node_keys_are_p384_openssh_as_flower_loads_them(tmp_path):
    keys = dp.make_node_keys(tmp_path, "node0")
    private = serialization.load_ssh_private_key(keys.private_key.read_bytes(), None)
    public = serialization.load_ssh_public_key(keys.public_key.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert private.public_key().public_numbers() == public.public_numbers()
    assert stat.S_IMODE(keys.private_key.stat().st_mode) == 0o600


def test_processes_stop_their_whole_tree_even_an_orphaned_grandchild(tmp_path):
    script = ("import subprocess, sys, time; "
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)")
    with dp.Processes() as procs:
        parent = procs.start("parent", [sys.executable, "-c", script], tmp_path / "p.log", dp.flower_env())
        deadline = time.monotonic() + 20
        while not psutil.Process(parent.pid).children() and time.monotonic() < deadline:
            time.sleep(0.05)
        child = psutil.Process(parent.pid).children()[0]
        assert procs.alive("parent")  # also notes the child
        parent.kill()  # the child is orphaned now
        parent.wait()
        assert child.is_running()
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE


def _wait_for(path: Path, procs: dp.Processes, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert procs.alive("superlink"), "the SuperLink died"
        assert time.monotonic() < deadline, "the hello app wrote no result"
        time.sleep(0.3)
    time.sleep(0.2)
    return json.loads(path.read_text())


@pytest.mark.deploy
def test_tls_and_node_authentication_let_in_only_registered_nodes(tmp_path):
    certs = dp.make_certificates(tmp_path / "certs")
    home = tmp_path / "home"
    started = {}
    with dp.Processes() as procs:
        address = dp.start_superlink(procs, tmp_path, dp.free_port(), certificates=certs, supernode_auth=True,
                                     database=tmp_path / "state.db", home=home)
        dp.write_flower_home(home, "tls", address, root_certificates=certs.ca_cert)
        for i in range(3):
            keys = dp.make_node_keys(tmp_path / "keys", f"node{i}")
            if i < 2:  # node2's key is never registered
                assert dp.register_node(home, "tls", keys.public_key) > 0
            dp.start_supernode(procs, tmp_path, f"node{i}", address, node_config={"partition-id": i},
                               certificates=certs, keys=keys, home=tmp_path / f"node{i}-home")
        started = dict(procs.pids)
        result = tmp_path / "result.json"
        dp.submit_run(home, HELLO, "tls", run_config={"result": str(result), "nodes": 2})  # runs from its FAB
        answer = _wait_for(result, procs)
        assert len(answer["nodes"]) == 2, answer  # the unregistered node never joined
        assert sorted(answer["answers"].values()) == [0, 1], answer
        # the SuperLink names node2's key as unknown; node2 keeps retrying, the registered nodes never had to
        pem = serialization.load_ssh_public_key((tmp_path / "keys" / "node2.pub").read_bytes()).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        refusals = [line for line in (tmp_path / "superlink.log").read_text().splitlines()
                    if "No SuperNode found with the given public key" in line]
        key_body = "".join(pem.splitlines()[1:-1])
        assert refusals and all(key_body in line.replace("\\n", "") for line in refusals), refusals
        assert "Connection attempt failed" in (tmp_path / "node2.log").read_text()
        assert "Connection attempt failed" not in (tmp_path / "node0.log").read_text()

        plain = tmp_path / "plain-home"  # the same SuperLink without TLS: refused
        dp.write_flower_home(plain, "plain", address)
        with pytest.raises(dp.DeployError):
            dp.run_status(plain, "plain", 1)
    for name, pid in started.items():
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, name
