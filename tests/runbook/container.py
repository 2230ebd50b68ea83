"""A Debian 12 container booted with systemd-nspawn, for the runbook.

The root is made once by debootstrap and kept under /var/cache/outbox-runbook/ (set
OUTBOX_RUNBOOK_CACHE to use another directory); each run boots a throwaway overlay of it, so the
cached root is never changed. The container shares the host's network: its PostgreSQL listens on
its Unix socket only (the host's own PostgreSQL has 127.0.0.1:5432), and a fake Partnero on the
host's loopback is reachable from inside.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

CACHE = Path(os.environ.get("OUTBOX_RUNBOOK_CACHE", "/var/cache/outbox-runbook"))
MIRROR = "http://deb.debian.org/debian"
# Bump when the root's recipe below changes: a root made by an older recipe is rebuilt.
RECIPE = "1"
PACKAGES = ["systemd", "systemd-sysv", "dbus", "python3-venv", "sudo", "ca-certificates", "procps"]
# The shop's own database and application role, as they exist before outbox is installed.
APP_PASSWORD = "APP-PASSWORD"
SHOP_SQL = f"""
CREATE ROLE shop_app LOGIN PASSWORD '{APP_PASSWORD}';
CREATE DATABASE shop;
"""
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def sh(*args: str, timeout: float = 1800, **kwargs: object) -> None:
    """Run a host command, its output passed through; fail on a non-zero exit."""
    subprocess.run(list(args), check=True, timeout=timeout, **kwargs)  # type: ignore[call-overload]


def host_tools() -> None:
    """debootstrap and systemd-nspawn on the host (Debian's packages), installed if missing."""
    wanted = {"debootstrap": "debootstrap", "systemd-nspawn": "systemd-container"}
    missing = [package for command, package in wanted.items() if shutil.which(command) is None]
    if missing:
        sh("apt-get", "install", "-y", *missing)


def cached_root() -> Path:
    """The Debian 12 root with what the runbook needs, made once and reused."""
    root = CACHE / f"bookworm-{RECIPE}"
    if (root / ".outbox-runbook-ready").exists():
        return root
    partial = CACHE / "bookworm.partial"
    shutil.rmtree(partial, ignore_errors=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    include = ",".join(PACKAGES)
    sh("debootstrap", "--variant=minbase", f"--include={include}", "bookworm", str(partial), MIRROR)
    _provision(partial)
    (partial / ".outbox-runbook-ready").touch()
    shutil.rmtree(root, ignore_errors=True)
    partial.rename(root)
    return root


def _provision(root: Path) -> None:
    """PostgreSQL 15 as the shop's database: Unix socket only, passwords (scram) for every role
    but postgres. Installed with services held back, so that nothing starts on the host's
    network while the root is made."""
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    (root / "etc/hostname").write_text("outbox-runbook\n")
    install = (
        "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
        "--no-install-recommends postgresql postgresql-client"
    )
    sh(*_nspawn(root), "--pipe", "--", "/bin/sh", "-ec", install)
    policy.unlink()
    conf = root / "etc/postgresql/15/main"
    with (conf / "postgresql.conf").open("a") as f:
        # The host's network is shared: no TCP at all, so no clash with a PostgreSQL on the
        # host, and the default port (pg_createcluster picked the next free one).
        f.write("\n# outbox runbook: Unix socket only, at the default port.\n")
        f.write("listen_addresses = ''\nport = 5432\n")
    (conf / "pg_hba.conf").write_text(
        "# outbox runbook: the administrator by peer, everyone else by password.\n"
        "local all postgres peer\n"
        "local all all scram-sha-256\n"
    )


def _nspawn(root: Path) -> list[str]:
    return ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "-D", str(root)]


class Container:
    """A booted, throwaway overlay of the cached root, driven with nsenter."""

    def __init__(self, lower: Path) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="outbox-runbook-", dir="/var/tmp"))
        self.root = self.work / "root"
        for name in ("upper", "overlay-work", "root"):
            (self.work / name).mkdir()
        options = (
            f"lowerdir={lower},upperdir={self.work / 'upper'},workdir={self.work / 'overlay-work'}"
        )
        sh("mount", "-t", "overlay", "overlay", "-o", options, str(self.root))
        self.log = (self.work / "console.log").open("w")
        self.nspawn = subprocess.Popen(
            [*_nspawn(self.root), "-b", "--console=passive"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = 0
        try:
            self.pid = self._init_pid()
        except BaseException:
            self.stop()
            raise

    def _init_pid(self, timeout: float = 30) -> int:
        """The container's PID 1, as the host sees it: systemd-nspawn's child."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited: {self.console()}")
            found = subprocess.run(
                ["pgrep", "-P", str(self.nspawn.pid)], capture_output=True, text=True, check=False
            ).stdout.split()
            for pid in found:  # an intermediate child first, then systemd once it exec'd
                try:
                    if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                        return int(pid)
                except FileNotFoundError:  # that intermediate child, gone meanwhile
                    continue
            time.sleep(0.1)
        raise RuntimeError(f"no container init after {timeout} s: {self.console()}")

    def console(self) -> str:
        return (self.work / "console.log").read_text(errors="replace")[-4000:]

    def exec(
        self, script: str, *, timeout: float = 600, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a shell script as root inside the container (in /root, `sh -e`)."""
        variables = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8", **(env or {})}
        command = [
            "nsenter",
            *("-t", str(self.pid), "-m", "-u", "-i", "-n", "-p", "-r", "-w"),
            "--",
            "/usr/bin/env",
            "-i",
            *(f"{k}={v}" for k, v in variables.items()),
            "/bin/sh",
            "-ec",
            f"cd /root\n{script}",
        ]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)

    def out(self, script: str, **kwargs: object) -> str:
        """A script's standard output; fail with its stderr when it fails."""
        done = self.exec(script, **kwargs)  # type: ignore[arg-type]
        if done.returncode != 0:
            raise AssertionError(f"`{script}` exited {done.returncode}: {done.stderr.strip()}")
        return done.stdout.strip()

    def wait_booted(self, timeout: float = 120) -> str:
        """Wait until systemd in the container says running (or degraded: a unit failed)."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.exec("systemctl is-system-running --wait || true", timeout=timeout)
            if state.stdout.strip() in ("running", "degraded"):
                return state.stdout.strip()
            time.sleep(0.2)  # its manager is not answering yet
        raise RuntimeError(f"the container did not boot ({state}): {self.console()}")

    def setup_shop(self) -> None:
        """The shop's database as it stands before outbox: a database and an app role."""
        self.out("systemctl start postgresql@15-main")
        self.out(f"runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 <<'SQL'\n{SHOP_SQL}SQL")

    def trust_the_hosts_network(self) -> None:
        """The host's extra CA certificates and /etc/pip.conf, for networks where HTTPS goes
        through an intercepting proxy (pip inside then trusts what pip outside trusts)."""
        extra = sorted(Path("/usr/local/share/ca-certificates").glob("*.crt"))
        for cert in extra:
            self.put(cert, "usr/local/share/ca-certificates")
        if extra:
            self.out("update-ca-certificates >/dev/null")
        if Path("/etc/pip.conf").exists():
            self.put(Path("/etc/pip.conf"), "etc")

    def put(self, source: Path, directory: str = "root") -> Path:
        target = self.root / directory / source.name
        shutil.copy2(source, target)
        return target

    def stop(self) -> None:
        """Power the container off (killed if it does not stop within a minute), unmount the
        overlay and delete it."""
        if self.nspawn.poll() is None:
            if self.pid:
                self.exec("systemctl poweroff --no-block", timeout=30)
            else:
                self.nspawn.terminate()  # its init asked to halt, as on SIGTERM
            try:
                self.nspawn.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.nspawn.pid, signal.SIGKILL)
                self.nspawn.wait(timeout=30)
        self.log.close()
        subprocess.run(["umount", str(self.root)], check=False)
        shutil.rmtree(self.work, ignore_errors=True)
