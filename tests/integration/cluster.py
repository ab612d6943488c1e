"""Real SPEAR processes on loopback for integration tests (no fakes).

Starts spear-worker processes (port 0; the LISTENING line gives the ports)
and a spear-router pointing at them, generates the Python gRPC stubs from
proto/ into the build directory, and tears everything down. Used by
tests/integration/*.py and tests/python/*.py.

Environment (set by ctest, see tests/integration/CMakeLists.txt):
  SPEAR_BUILD_DIR    the CMake build directory (binaries, generated stubs)
  SPEAR_SOURCE_DIR   the source tree (proto/)
  SPEAR_TEST_MODEL   model for the workers (default: SmolLM2 from the cache)
"""
import os
import re
import select
import signal
import subprocess
import sys
import time
import urllib.request

SOURCE = os.environ.get("SPEAR_SOURCE_DIR", os.path.abspath(os.path.join(os.path.dirname(__file__), "../..")))
BUILD = os.environ.get("SPEAR_BUILD_DIR", os.path.join(SOURCE, "build"))
STUBS = os.path.join(BUILD, "tests", "pystubs")


def smollm2_path():
    if os.environ.get("SPEAR_TEST_MODEL"):
        return os.environ["SPEAR_TEST_MODEL"]
    home = os.environ.get("SPEAR_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "spear")
    p = os.path.join(home, "models", "smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf")
    return p if os.path.exists(p) else None


def gen_stubs():
    """python -m grpc_tools.protoc into the build dir (once); returns the path.
    grpc.health.v1 is generated as the module `spear_health.health_pb2` (a
    top-level `grpc` package would shadow grpcio itself)."""
    marker = os.path.join(STUBS, "spear", "v1", "generation_pb2_grpc.py")
    protos = [os.path.join(SOURCE, "proto", "spear", "v1", f) for f in ("generation.proto", "worker.proto")]
    if not os.path.exists(marker) or any(os.path.getmtime(p) > os.path.getmtime(marker) for p in protos):
        os.makedirs(os.path.join(STUBS, "_src", "spear_health"), exist_ok=True)
        with open(os.path.join(SOURCE, "router", "proto", "grpc", "health", "v1", "health.proto")) as f:
            health = f.read()
        with open(os.path.join(STUBS, "_src", "spear_health", "health.proto"), "w") as f:
            f.write(health)
        subprocess.check_call([sys.executable, "-m", "grpc_tools.protoc",
                               "-I", os.path.join(SOURCE, "proto"), "-I", os.path.join(STUBS, "_src"),
                               "--python_out", STUBS, "--grpc_python_out", STUBS,
                               "spear/v1/generation.proto", "spear/v1/worker.proto",
                               "spear_health/health.proto"])
        for d in ("spear", "spear/v1", "spear_health"):
            open(os.path.join(STUBS, d, "__init__.py"), "a").close()
    if STUBS not in sys.path:
        sys.path.insert(0, STUBS)
    return STUBS


def binary(name):
    for rel in (("router", name), ("worker", name), ("cli", name)):
        p = os.path.join(BUILD, *rel)
        if os.path.exists(p):
            return p
    raise FileNotFoundError(f"{name} not built in {BUILD}")


def _read_listening(proc, timeout, what):
    deadline = time.time() + timeout
    buf = b""
    while time.time() < deadline:
        r, _, _ = select.select([proc.stdout], [], [], 0.2)
        if r:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            buf += chunk
            m = re.search(rb"LISTENING grpc=(\d+) metrics=(-?\d+)([^\n]*)\n", buf)
            if m:
                return int(m.group(1)), int(m.group(2)), m.group(3).decode()
        if proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"{what} did not print LISTENING (rc={proc.poll()}, out={buf[-300:]!r})")


class Proc:
    def __init__(self, args, what, timeout=180, env=None):
        self.args = args
        self.what = what
        self.log = open(os.path.join(BUILD, "tests", f"{what}.{os.getpid()}.{int(time.time()*1000)}.log"), "wb")
        self.p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.log, env=env)
        self.port, self.metrics_port, self.extra = _read_listening(self.p, timeout, what)

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    def signal(self, sig):
        if self.p.poll() is None:
            self.p.send_signal(sig)

    def wait(self, timeout=60):
        return self.p.wait(timeout=timeout)

    def stop(self, timeout=30):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.log.close()
        return self.p.returncode


def start_worker(model, worker_id, threads=1, kv_tokens=4096, extra=()):
    args = [binary("spear-worker"), "--model", model, "--host", "127.0.0.1", "--port", "0",
            "--metrics-port", "0", "--threads", str(threads), "--kv-tokens", str(kv_tokens),
            "--worker-id", worker_id, *extra]
    p = Proc(args, worker_id)
    p.worker_id = worker_id
    return p


def start_router(model, workers, extra=()):
    args = [binary("spear-router"), "--model", model, "--host", "127.0.0.1", "--port", "0",
            "--metrics-port", "0", "--workers", ",".join(w.address for w in workers),
            "--health-interval-ms", "100", "--stats-interval-ms", "50", *extra]
    return Proc(args, "router", timeout=60)


def metrics(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def metric_value(text, name, **labels):
    """Sum of the samples of `name` whose labels include `labels`."""
    total, found = 0.0, False
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
        if not m or m.group(1) != name:
            continue
        lab = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(lab.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
            found = True
    return total if found else None


def wait_healthy(stub_module, channel, n, timeout=60, metadata=None):
    """Waits until ListModels reports n healthy workers."""
    import grpc  # noqa
    gen = stub_module
    stub = gen.GenerationStub(channel)
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            from spear.v1 import generation_pb2
            r = stub.ListModels(generation_pb2.ListModelsRequest(), timeout=2, metadata=metadata)
            last = r
            if r.models and r.models[0].healthy_workers >= n:
                return r
        except Exception as e:  # noqa: BLE001 - keep polling
            last = e
        time.sleep(0.1)
    raise RuntimeError(f"workers not healthy: {last}")
