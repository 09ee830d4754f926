"""A real two-node Slurm cluster on one machine, for tests and by hand.

    python -m sage_megatron.testing.slurm_cluster up       # prints `export SLURM_CONF=...`
    python -m sage_megatron.testing.slurm_cluster status
    python -m sage_megatron.testing.slurm_cluster down     # also cleans leftovers of crashed runs

    with SlurmCluster() as cluster:                          # or the `slurm_cluster` pytest fixture
        job = cluster.sbatch("scripts/slurm/train.sbatch", sbatch_args=["-N", "2"], env={...})
        info = cluster.wait_job(job, timeout=180)            # JobInfo(state="COMPLETED", exit_code=0)

What it builds (needs root, Debian's slurm-wlm and munge: `scripts/setup.sh --slurm`):

  root network namespace                     one network namespace per node ("sgslurm-<node>")
  -------------------------------------      ---------------------------------------------------
  munged   (own key + socket in the tmp dir)
  slurmctld (UTS hostname "sgctl")           slurmd -N sgnode1   UTS hostname sgnode1, eth0 = 10.213.77.11
  bridge sgslbr0 = 10.213.77.1/24  <--veth-->     ...           (same for sgnode2 = .12, ...)

Each node gets its own hostname and its own private IP address inside a namespace this module
creates, so Ray (whose node identity is the IP) forms a genuine N-node cluster across them,
and `srun`, `hostname --ip-address` and socket-interface settings behave as on real nodes.
The namespaces have no default route: no packet can leave the machine. Node names go in
/etc/hosts, each line tagged with HOSTS_TAG. The file system and the process table are shared
(a real cluster would not share them): never `ray stop` inside a job here.

Why namespaces rather than several slurmd on 127.0.0.1 with distinct ports: the latter gives a
Slurm cluster of two nodes but a Ray cluster whose two raylets share one IP; Ray then treats
them as two raylets of the same host (same node IP), `hostname --ip-address` answers the same
on both, and a launch script that is wrong about node addresses would still pass.

Job processes are tracked by process group (proctrack/pgid), so a step's stray children (say, a
multiprocessing server a rank forgot to shut down) are killed when the step ends, as cgroup
tracking does on real clusters; with proctrack/linuxproc such orphans escape and hold the step's
stdout open (~60 s delay at step end).

Teardown (also on a failed test, and at the start of every `up` for leftovers of a crashed run):
cancel jobs; stop slurmd/slurmctld/munged; kill every process still inside our namespaces or
naming our temp dir; delete namespaces, veths and the bridge; remove our /etc/hosts lines and
the temp dir. `leftovers()` reports anything that remains, so tests can assert a clean state.

Only one such cluster can exist on a machine at a time (fixed names and subnet); a second
`up` while the owner process of the first is alive raises ClusterBusyError.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import ipaddress
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from sage_megatron.procs import free_port, proc_start_time

HOSTS_FILE = Path("/etc/hosts")
HOSTS_TAG = "# sage-slurm-cluster"
NETNS_PREFIX = "sgslurm-"
LINK_PREFIX = "sgsl"  # host-side veths "sgslv<i>" and bridge "sgslbr0" (<= 15 chars)
BRIDGE = "sgslbr0"
TMP_PREFIX = "sgslurm-"
LOCK_FILE = Path("/run/lock/sgslurm.lock")


class ClusterError(RuntimeError):
    """The cluster could not be brought up or torn down; the message names what failed."""


class ClusterBusyError(ClusterError):
    """Another live process owns the machine's test cluster."""


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """Shape of the emulated cluster."""

    num_nodes: int = 2
    """Number of compute nodes (network namespaces, one slurmd each)."""
    node_prefix: str = "sgnode"
    """Node names are <prefix>1..<prefix>N (also their hostnames)."""
    controller: str = "sgctl"
    """Hostname of slurmctld (root namespace, the bridge address)."""
    subnet: str = "10.213.77.0/24"
    """Private subnet for the bridge (.1) and the nodes (.11, .12, ...). Must not overlap any route."""
    cpus_per_node: int = 0
    """CPUs Slurm advertises per node; 0 = os.cpu_count() (the nodes share the machine's cores)."""
    gpus_per_node: int = 8
    """GRES "gpu" per node, backed by stand-in device files (character devices 1:3, like /dev/null:
    Slurm drops file-less GPUs), so scripts that ask for --gpus-per-node=8 run unchanged; jobs see
    CUDA_VISIBLE_DEVICES but there is no GPU behind it. 0 disables GRES."""
    memory_mb: int = 4096
    """RealMemory advertised per node."""
    partition: str = "debug"
    base_dir: str = "/tmp"
    """Where the temp dir (config, state, spool, logs, munge socket) is created. Keep the path short:
    Ray puts unix sockets under it and those are limited to 107 characters."""
    start_timeout_s: float = 60.0

    @property
    def node_names(self) -> list[str]:
        return [f"{self.node_prefix}{i + 1}" for i in range(self.num_nodes)]

    def addresses(self) -> tuple[str, list[str]]:
        """(bridge/controller address, node addresses)."""
        net = ipaddress.ip_network(self.subnet)
        hosts = list(net.hosts())
        if len(hosts) < 11 + self.num_nodes:
            raise ClusterError(f"subnet {self.subnet} too small for {self.num_nodes} nodes")
        return str(hosts[0]), [str(hosts[10 + i]) for i in range(self.num_nodes)]


@dataclasses.dataclass(frozen=True)
class JobInfo:
    """What `scontrol show job` says about a job."""

    job_id: str
    state: str
    exit_code: int
    signal: int
    reason: str
    raw: Mapping[str, str]

    @property
    def finished(self) -> bool:
        return self.state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED",
                                  "REQUEUED", "RESIZING", "SIGNALING", "STAGE_OUT")


# ----------------------------------------------------------------------------------------------
# small helpers


def _run(cmd: Sequence[str], *, check: bool = True, env: Mapping[str, str] | None = None,
         timeout: float = 30, input: str | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run(list(cmd), capture_output=True, text=True, env=env, timeout=timeout, input=input)
    if check and p.returncode != 0:
        raise ClusterError(f"{' '.join(cmd)} failed (rc {p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    return p


def unavailable_reason() -> str | None:
    """Why a local cluster cannot be built here (for pytest skips), or None."""
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (network namespaces, /etc/hosts, slurmd)"
    missing = [t for t in ("slurmctld", "slurmd", "munged", "sbatch", "scontrol", "ip", "nsenter", "unshare")
               if shutil.which(t) is None]
    if missing:
        return f"missing tools {missing}: run `scripts/setup.sh --slurm` (installs slurm-wlm and munge)"
    return None


def _require_root_and_tools() -> None:
    reason = unavailable_reason()
    if reason:
        raise ClusterError(reason)


def _alive(pid: int | None, start_time: int | None = None) -> bool:
    if not pid:
        return False
    st = proc_start_time(pid)
    if st is None:
        return False
    try:  # zombies count as dead
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    except OSError:
        return False
    return start_time is None or st == start_time


def _netns_inode(name: str) -> int | None:
    try:
        return os.stat(f"/run/netns/{name}").st_ino
    except OSError:
        return None


def _ancestors() -> set[int]:
    out, pid = set(), os.getpid()
    while pid > 1:
        out.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return out


def _processes() -> Iterator[tuple[int, str, int | None]]:
    """(pid, cmdline, net-namespace inode) of every live, non-zombie process."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        pid = int(d.name)
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            if not cmd:  # kernel thread or zombie
                continue
            m = re.match(r"net:\[(\d+)\]", os.readlink(d / "ns" / "net"))
            yield pid, cmd, int(m.group(1)) if m else None
        except OSError:
            continue


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _own_netns_inode() -> int | None:
    m = re.match(r"net:\[(\d+)\]", os.readlink("/proc/self/ns/net"))
    return int(m.group(1)) if m else None


def find_processes(*, netns_inodes: set[int], markers: Sequence[str]) -> list[tuple[int, str]]:
    """Processes inside one of `netns_inodes`, or whose command line contains a marker (a temp dir).
    The caller's own network namespace is never matched by inode (it is the machine's)."""
    netns_inodes = set(netns_inodes) - {_own_netns_inode()}
    skip = _ancestors()
    out = []
    for pid, cmd, ino in _processes():
        if pid in skip:
            continue
        if (ino is not None and ino in netns_inodes) or any(m and m in cmd for m in markers):
            out.append((pid, cmd))
    return out


def _kill_all(*, netns_inodes: set[int], markers: Sequence[str], grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, every process found by find_processes; repeat until none (forks)."""
    deadline = time.monotonic() + grace_s
    sig = signal.SIGTERM
    for _ in range(200):
        procs = find_processes(netns_inodes=netns_inodes, markers=markers)
        if not procs:
            return
        if time.monotonic() > deadline:
            sig = signal.SIGKILL
        for pid, _cmd in procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        time.sleep(0.1)
    left = find_processes(netns_inodes=netns_inodes, markers=markers)
    if left:
        raise ClusterError(f"processes survived SIGKILL: {left[:5]}")


@contextlib.contextmanager
def _op_lock() -> Iterator[None]:
    """Serialises up/down between processes (not held for the cluster's lifetime)."""
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK_FILE, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------
# /etc/hosts, namespaces, links


def _hosts_add(entries: Sequence[tuple[str, str]]) -> None:
    text = HOSTS_FILE.read_text()
    if text and not text.endswith("\n"):
        text += "\n"
    text += "".join(f"{ip} {name} {HOSTS_TAG}\n" for ip, name in entries)
    _write_in_place(HOSTS_FILE, text)


def _hosts_remove() -> int:
    lines = HOSTS_FILE.read_text().splitlines(keepends=True)
    keep = [ln for ln in lines if HOSTS_TAG not in ln]
    if len(keep) != len(lines):
        _write_in_place(HOSTS_FILE, "".join(keep))
    return len(lines) - len(keep)


def _write_in_place(path: Path, text: str) -> None:
    # /etc/hosts may be a bind mount: rewrite the inode, never rename over it.
    with open(path, "r+") as f:
        f.seek(0)
        f.write(text)
        f.truncate()


def _our_netns() -> list[str]:
    p = _run(["ip", "netns", "list"], check=False)
    return [ln.split()[0] for ln in p.stdout.splitlines() if ln.startswith(NETNS_PREFIX)]


def _our_links() -> list[str]:
    p = _run(["ip", "-o", "link", "show"], check=False)
    names = []
    for ln in p.stdout.splitlines():
        m = re.match(r"\d+:\s+([^:@\s]+)", ln)
        if m and m.group(1).startswith(LINK_PREFIX):
            names.append(m.group(1))
    return names


def _our_tmp_dirs(base_dir: str = "/tmp") -> list[Path]:
    return sorted(p for p in Path(base_dir).glob(TMP_PREFIX + "*") if p.is_dir())


def _read_state(d: Path) -> dict:
    try:
        return json.loads((d / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def leftovers(base_dir: str = "/tmp", *, netns_inodes: set[int] | None = None) -> dict[str, list]:
    """Everything of ours still on the machine: processes, namespaces, links, hosts lines, temp dirs.

    Processes are those inside our namespaces (current ones, plus `netns_inodes` recorded earlier,
    since a deleted namespace stays alive while a process is in it), or naming one of our temp dirs,
    or Slurm/munge daemons pointing at a sgslurm- path.
    """
    inodes = set(netns_inodes or ())
    inodes.update(i for i in (_netns_inode(n) for n in _our_netns()) if i is not None)
    for d in _our_tmp_dirs(base_dir):
        st = _read_state(d)
        if st.get("boot_id") == _boot_id():  # inode numbers mean nothing after a reboot
            inodes.update(st.get("netns_inodes", []))
    procs = find_processes(netns_inodes=inodes, markers=[os.path.join(base_dir, TMP_PREFIX)])
    hosts = [ln.strip() for ln in HOSTS_FILE.read_text().splitlines() if HOSTS_TAG in ln]
    return {"processes": procs, "netns": _our_netns(), "links": _our_links(), "hosts_lines": hosts,
            "tmp_dirs": [str(p) for p in _our_tmp_dirs(base_dir)]}


def cleanup_stale(base_dir: str = "/tmp", *, force: bool = False) -> list[str]:
    """Remove leftovers of earlier clusters whose owner process is gone. Returns what was removed.

    With force=False a cluster whose recorded owner is alive (a running test session, or a
    cluster started by `up`, recorded with owner None) raises ClusterBusyError instead.
    """
    removed: list[str] = []
    dirs = _our_tmp_dirs(base_dir)
    inodes: set[int] = set()
    for d in dirs:
        st = _read_state(d)
        owner, owner_start = st.get("owner_pid"), st.get("owner_start")
        if not force and st.get("manual"):
            raise ClusterBusyError(f"a cluster started by `up` is running ({d}); run "
                                   f"`python -m sage_megatron.testing.slurm_cluster down` first")
        if not force and owner and owner != os.getpid() and _alive(owner, owner_start):
            raise ClusterBusyError(f"the local Slurm cluster in {d} is in use by live pid {owner}")
        if st.get("boot_id") == _boot_id():  # inode numbers mean nothing after a reboot
            inodes.update(st.get("netns_inodes", []))
    # Jobs first, while slurmctld may still answer (best effort: no accounting, short timeouts).
    for d in dirs:
        conf = d / "slurm.conf"
        if conf.exists():
            env = {**os.environ, "SLURM_CONF": str(conf)}
            with contextlib.suppress(Exception):
                _run(["scancel", "--full", "--quiet", "-u", "root"], check=False, env=env, timeout=5)
    inodes.update(i for i in (_netns_inode(n) for n in _our_netns()) if i is not None)
    procs = find_processes(netns_inodes=inodes, markers=[os.path.join(base_dir, TMP_PREFIX)])
    if procs:
        removed.append(f"{len(procs)} processes")
        _kill_all(netns_inodes=inodes, markers=[os.path.join(base_dir, TMP_PREFIX)])
    for ns in _our_netns():
        _run(["ip", "netns", "delete", ns], check=False)
        removed.append(f"netns {ns}")
    for link in _our_links():
        _run(["ip", "link", "delete", link], check=False)
        removed.append(f"link {link}")
    n = _hosts_remove()
    if n:
        removed.append(f"{n} /etc/hosts lines")
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
        removed.append(f"dir {d}")
    return removed


# ----------------------------------------------------------------------------------------------
# the cluster


class SlurmCluster:
    """A live Slurm cluster (slurmctld + one slurmd per emulated node) on this machine.

    Use as a context manager; `up()` / `down()` for explicit control. `env` is the environment
    to give Slurm client commands (SLURM_CONF). `down()` is idempotent and never raises for
    things already gone.
    """

    def __init__(self, spec: ClusterSpec = ClusterSpec(), *, manual: bool = False) -> None:
        self.spec = spec
        self.manual = manual
        self.dir: Path | None = None
        self.netns_inodes: set[int] = set()
        self._procs: list[subprocess.Popen] = []
        self._slurmd: dict[str, subprocess.Popen] = {}
        self.ctl_addr, self.node_addrs = spec.addresses()
        self.ctl_port = 0

    # -- paths and environment
    @property
    def conf(self) -> Path:
        assert self.dir is not None, "cluster is not up"
        return self.dir / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """os.environ plus SLURM_CONF; pass to sbatch/srun/scontrol/sinfo."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    @property
    def ray_tmp_dir(self) -> str:
        """A short directory for Ray's temp files (removed with the cluster)."""
        assert self.dir is not None
        return str(self.dir / "ray")

    def netns(self, node: str) -> str:
        return NETNS_PREFIX + node

    # -- lifecycle
    def __enter__(self) -> "SlurmCluster":
        self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> "SlurmCluster":
        _require_root_and_tools()
        with _op_lock():
            cleanup_stale(self.spec.base_dir)
            try:
                self._up()
            except BaseException:
                if not os.environ.get("SAGE_SLURM_KEEP_ON_FAIL"):  # debugging aid: leave it for `down`
                    self._down()
                raise
        return self

    def _up(self) -> None:
        spec = self.spec
        self._check_subnet()
        self.dir = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=spec.base_dir))
        os.chmod(self.dir, 0o755)
        for sub in ("munge", "state", "spool", "log", "run", "ray",
                    *(f"spool/{n}" for n in spec.node_names)):
            (self.dir / sub).mkdir(mode=0o755)
        self._save_state()
        self._start_munge()
        self._make_network()
        self._save_state()
        _hosts_add([(self.ctl_addr, spec.controller)]
                   + list(zip(self.node_addrs, spec.node_names)))
        self.ctl_port = free_port()
        self._write_conf()
        self._start_slurmctld()
        for name in spec.node_names:
            self._start_slurmd(name)
        self._wait_idle()

    def down(self) -> None:
        with _op_lock():
            self._down()

    def _down(self) -> None:
        if self.dir is not None and self.conf.exists():
            with contextlib.suppress(Exception):
                _run(["scancel", "--full", "--quiet", "-u", "root"], check=False, env=self.env, timeout=5)
        markers = [str(self.dir)] if self.dir is not None else []
        inodes = set(self.netns_inodes)
        inodes.update(i for i in (_netns_inode(self.netns(n)) for n in self.spec.node_names) if i)
        with contextlib.suppress(ClusterError):
            _kill_all(netns_inodes=inodes, markers=markers)
        for p in self._procs:  # reap our direct children (no zombies)
            with contextlib.suppress(Exception):
                p.kill()
                p.wait(timeout=5)
        self._procs.clear()
        for name in self.spec.node_names:
            _run(["ip", "netns", "delete", self.netns(name)], check=False)
        for link in _our_links():
            _run(["ip", "link", "delete", link], check=False)
        _hosts_remove()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None

    # -- pieces
    def _save_state(self) -> None:
        assert self.dir is not None
        st = {"owner_pid": None if self.manual else os.getpid(),
              "owner_start": None if self.manual else proc_start_time(os.getpid()),
              "manual": self.manual, "netns_inodes": sorted(self.netns_inodes), "boot_id": _boot_id(),
              "nodes": self.spec.node_names, "created": time.time()}
        (self.dir / "state.json").write_text(json.dumps(st))

    def _check_subnet(self) -> None:
        net = ipaddress.ip_network(self.spec.subnet)
        out = _run(["ip", "-4", "route", "show"]).stdout
        for ln in out.splitlines():
            dst = ln.split()[0]
            if dst == "default":
                continue
            with contextlib.suppress(ValueError):
                if ipaddress.ip_network(dst, strict=False).overlaps(net):
                    raise ClusterError(f"subnet {net} overlaps the route `{ln}`; pick another ClusterSpec.subnet")

    def _spawn(self, cmd: Sequence[str], log: str) -> subprocess.Popen:
        assert self.dir is not None
        f = open(self.dir / "log" / log, "ab")
        p = subprocess.Popen(list(cmd), stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, cwd=str(self.dir))
        f.close()
        self._procs.append(p)
        return p

    def _start_munge(self) -> None:
        d = self.dir
        assert d is not None
        key = d / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        sock = d / "munge" / "munge.socket.2"
        p = self._spawn(["munged", "--foreground", "--force", f"--socket={sock}", f"--key-file={key}",
                         f"--pid-file={d / 'run' / 'munged.pid'}", f"--log-file={d / 'log' / 'munged.log'}",
                         f"--seed-file={d / 'munge' / 'munged.seed'}"], "munged.out")
        self._wait(lambda: sock.exists(), "munged socket", proc=p, log="munged.log")

    def _make_network(self) -> None:
        net = ipaddress.ip_network(self.spec.subnet)
        _run(["ip", "link", "add", BRIDGE, "type", "bridge"])
        _run(["ip", "addr", "add", f"{self.ctl_addr}/{net.prefixlen}", "dev", BRIDGE])
        _run(["ip", "link", "set", BRIDGE, "up"])
        for i, (name, addr) in enumerate(zip(self.spec.node_names, self.node_addrs)):
            ns, host_end, peer = self.netns(name), f"{LINK_PREFIX}v{i + 1}", f"{LINK_PREFIX}p{i + 1}"
            _run(["ip", "netns", "add", ns])
            ino = _netns_inode(ns)
            if ino:
                self.netns_inodes.add(ino)
            _run(["ip", "link", "add", host_end, "type", "veth", "peer", "name", peer])
            _run(["ip", "link", "set", peer, "netns", ns])
            _run(["ip", "link", "set", host_end, "master", BRIDGE])
            _run(["ip", "link", "set", host_end, "up"])
            inside = ["ip", "-n", ns]
            _run(inside + ["link", "set", peer, "name", "eth0"])  # like a real node's NIC name
            _run(inside + ["addr", "add", f"{addr}/{net.prefixlen}", "dev", "eth0"])
            _run(inside + ["link", "set", "eth0", "up"])
            _run(inside + ["link", "set", "lo", "up"])

    def _write_conf(self) -> None:
        d, spec = self.dir, self.spec
        assert d is not None
        cpus = spec.cpus_per_node or os.cpu_count() or 1
        gres = f" Gres=gpu:{spec.gpus_per_node}" if spec.gpus_per_node else ""
        nodes = "\n".join(f"NodeName={n} NodeAddr={a} NodeHostname={n} CPUs={cpus} "
                          f"RealMemory={spec.memory_mb}{gres} State=UNKNOWN"
                          for n, a in zip(spec.node_names, self.node_addrs))
        conf = f"""\
# Written by sage_megatron.testing.slurm_cluster; removed with {d}.
ClusterName=sagetest
SlurmctldHost={spec.controller}({self.ctl_addr})
SlurmctldPort={self.ctl_port}
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge/munge.socket.2
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SchedulerType=sched/backfill
MinJobAge=900
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
{"GresTypes=gpu" if spec.gpus_per_node else ""}
{nodes}
PartitionName={spec.partition} Nodes={",".join(spec.node_names)} Default=YES MaxTime=INFINITE State=UP
"""
        (d / "slurm.conf").write_text(conf)
        if spec.gpus_per_node:
            # Slurm drops file-less GPUs, so each node gets N empty files standing in for /dev/nvidiaN
            # (nothing opens them: TaskPlugin=task/none constrains no devices).
            lines = ["AutoDetect=off"]
            for n in spec.node_names:
                dev = d / "dev" / n
                dev.mkdir(parents=True)
                for g in range(spec.gpus_per_node):  # character devices 1:3, i.e. like /dev/null
                    os.mknod(dev / f"nvidia{g}", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
                lines.append(f"NodeName={n} Name=gpu File={dev}/nvidia[0-{spec.gpus_per_node - 1}]")
            (d / "gres.conf").write_text("\n".join(lines) + "\n")

    def _start_slurmctld(self) -> None:
        # Own UTS namespace so gethostname() == SlurmctldHost; root network namespace (the bridge address).
        p = self._spawn(["unshare", "--uts", "sh", "-c",
                         f'hostname {self.spec.controller} && exec slurmctld -D -c -i -f "$0"', str(self.conf)],
                        "slurmctld.out")
        self._wait(lambda: _run(["scontrol", "ping"], check=False, env=self.env, timeout=10).stdout.count("UP") > 0,
                   "slurmctld answering `scontrol ping`", proc=p, log="slurmctld.log")

    def _start_slurmd(self, name: str) -> None:
        # nsenter, not `ip netns exec` (which remounts /sys and breaks slurmd's start-up).
        self._slurmd[name] = self._spawn(["nsenter", f"--net=/run/netns/{self.netns(name)}", "unshare", "--uts", "sh", "-c",
                     f'hostname {name} && exec slurmd -D -f "$0" -N {name}', str(self.conf)],
                    f"slurmd-{name}.out")

    def _wait_idle(self) -> None:
        names = set(self.spec.node_names)

        def idle() -> bool:
            dead = [n for n, p in self._slurmd.items() if p.poll() is not None]
            if dead:
                raise ClusterError(f"slurmd on {dead} exited during start-up\n{self.log_tail()}")
            out = _run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False, env=self.env, timeout=10).stdout
            states = dict(ln.split() for ln in out.splitlines() if len(ln.split()) == 2)
            return all(states.get(n) == "idle" for n in names)

        self._wait(idle, "all nodes idle in sinfo", timeout=15)

    def _wait(self, ok, what: str, *, proc: subprocess.Popen | None = None, log: str = "",
              timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.spec.start_timeout_s)
        while time.monotonic() < deadline:
            if ok():
                return
            if proc is not None and proc.poll() is not None:
                break
            time.sleep(0.2)
        raise ClusterError(f"timed out waiting for {what}\n{self.log_tail(log)}")

    # -- use
    def log_tail(self, name: str = "", lines: int = 30) -> str:
        """The last lines of one of the cluster's logs (all logs when name is empty)."""
        if self.dir is None:
            return ""
        files = [self.dir / "log" / name] if name else sorted((self.dir / "log").iterdir())
        out = []
        for f in files:
            with contextlib.suppress(OSError):
                tail = f.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {f.name}\n" + "\n".join(tail))
        return "\n".join(out)

    def sinfo(self) -> dict[str, str]:
        """{node: state} from sinfo."""
        out = _run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env).stdout
        return dict(ln.split() for ln in out.splitlines() if len(ln.split()) == 2)

    def sbatch(self, script: str | os.PathLike, *, sbatch_args: Sequence[str] = (),
               script_args: Sequence[str] = (), env: Mapping[str, str] | None = None,
               cwd: str | os.PathLike | None = None) -> str:
        """Submits a batch script; returns the job id. `env` entries are added to self.env."""
        full_env = {**self.env, **(env or {})}
        p = subprocess.run(["sbatch", "--parsable", *sbatch_args, str(script), *script_args],
                           capture_output=True, text=True, env=full_env, cwd=cwd, timeout=30)
        if p.returncode != 0:
            raise ClusterError(f"sbatch {script} failed: {p.stderr.strip()}")
        return p.stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> JobInfo:
        out = _run(["scontrol", "show", "job", "-o", str(job_id)], env=self.env).stdout
        raw = dict(kv.split("=", 1) for kv in out.split() if "=" in kv)
        code, _, sig = raw.get("ExitCode", "0:0").partition(":")
        return JobInfo(job_id=str(job_id), state=raw.get("JobState", "UNKNOWN"), exit_code=int(code or 0),
                       signal=int(sig or 0), reason=raw.get("Reason", ""), raw=raw)

    def wait_job(self, job_id: str, *, timeout: float = 300, poll_s: float = 0.5) -> JobInfo:
        """Polls `scontrol show job` (no accounting here, so no sacct) until the job is finished."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job_info(job_id)
            if info.finished:
                return info
            if time.monotonic() > deadline:
                _run(["scancel", str(job_id)], check=False, env=self.env)
                raise ClusterError(f"job {job_id} still {info.state} after {timeout:.0f} s (cancelled)\n"
                                   f"{self.log_tail()}")
            time.sleep(poll_s)


def _find_running() -> Path | None:
    dirs = [d for d in _our_tmp_dirs() if (d / "slurm.conf").exists()]
    return dirs[-1] if dirs else None


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sage_megatron.testing.slurm_cluster",
                                 description="A real Slurm cluster with emulated nodes on this machine.")
    ap.add_argument("action", choices=["up", "down", "status"])
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    a = ap.parse_args(argv)
    if a.action == "up":
        c = SlurmCluster(ClusterSpec(num_nodes=a.nodes, gpus_per_node=a.gpus_per_node), manual=True)
        c.up()
        print(f"cluster up: nodes {', '.join(c.spec.node_names)}; logs in {c.dir}/log\n"
              f"export SLURM_CONF={c.conf}", flush=True)
        return 0
    if a.action == "down":
        _require_root_and_tools()
        with _op_lock():
            removed = cleanup_stale(force=True)
        print("removed: " + (", ".join(removed) if removed else "nothing"))
        return 0
    d = _find_running()
    if d is None:
        print("no cluster")
    else:
        env = {**os.environ, "SLURM_CONF": str(d / "slurm.conf")}
        print(f"export SLURM_CONF={d / 'slurm.conf'}")
        print(_run(["sinfo", "-N"], check=False, env=env).stdout.rstrip())
    left = leftovers()
    print("ours on this machine: " + json.dumps({k: len(v) for k, v in left.items()}))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
