#!/usr/bin/env python3
"""Whole-gateway load benchmark: starts a private redis-server, the simulator, chatgate,
nginx (a plain proxy_pass baseline) and the floor (benches/load/floor.rs: a bare Pingora
proxy_pass, the framework chatgate is built on doing none of chatgate's work) on loopback, drives them with wrk and benches/load/loadgen,
and prints one markdown table. Run through benches/load/run.sh (it installs what is missing).

Everything binds to 127.0.0.1; every load step is bounded in time and stops by itself.
"""

import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
HERE = os.path.dirname(os.path.abspath(__file__))
DURATION = int(os.environ.get("DURATION", "10"))  # seconds per closed-loop / fixed-rate step
CONNECTIONS = int(os.environ.get("CONNECTIONS", "32"))  # wrk connections
STREAMS = [int(n) for n in os.environ.get("STREAMS", "1000,10000").split(",") if n]
PACE_MS = int(os.environ.get("PACE_MS", "500"))  # simulator delay between streamed chunks
STREAM_CHUNKS = int(os.environ.get("STREAM_CHUNKS", "20"))
RATES = [int(r) for r in os.environ.get("RATES", "500,2000").split(",") if r]
ACCESS_LOG = os.environ.get("ACCESS_LOG", "both")  # warn | info | both
# record step: alternated rounds of the gateway with the record off and on
RECORD_ROUNDS = int(os.environ.get("RECORD_ROUNDS", "6"))
# record step: 0 sends the usual one-line question; N sends a conversation of about N KiB
# (earlier turns included, as chat clients send them), which PostgreSQL compresses
RECORD_MESSAGES_KB = int(os.environ.get("RECORD_MESSAGES_KB", "0"))
STEPS = os.environ.get("STEPS", "closed,fixed,streams,flood").split(",")
# on: per-user request and token limits are checked on every chat call (set far above the
# load, so they cost their Redis calls but refuse nothing); off: no chat limits at all.
LIMITS = os.environ.get("LIMITS", "on")
JWT_SECRET = "bench-secret-0123456789-abcdefghijklmnopqrstuvwxyz"
CLK_TCK = os.sysconf("SC_CLK_TCK")
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (_hard, _hard))  # children inherit it
FD_LIMIT = _hard

CHAT_BODY = json.dumps([{"role": "user", "content": "Hello, who are you?"}])
OPENAI_BODY = json.dumps(
    {
        "model": "bench-model",
        "messages": [
            {"role": "system", "content": "You are the openEuler community assistant, your name is XiaoZhi."},
            {"role": "user", "content": "Hello, who are you?"},
        ],
        "stream": False,
    }
)


def conversation_body(kib):
    """A chat body of about `kib` KiB: alternating user and assistant turns cut from this
    repository's docs (English prose, as compressible as a real conversation), then a question."""
    docs = os.path.join(ROOT, "docs")
    text = "".join(open(os.path.join(docs, f)).read() for f in sorted(os.listdir(docs)) if f.endswith(".md"))
    turns, at = [], 0
    while sum(len(t["content"]) for t in turns) < kib * 1024:
        size = 300 if len(turns) % 2 == 0 else 1200
        turns.append({"role": "user" if len(turns) % 2 == 0 else "assistant",
                      "content": text[at:at + size]})
        at = (at + size) % max(len(text) - 1200, 1)
    if turns[-1]["role"] == "user":
        turns.pop()
    return json.dumps(turns + [{"role": "user", "content": "Hello, who are you?"}])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, within=15.0):
    deadline = time.time() + within
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Procs:
    """The processes this run started, stopped by their own pids at exit."""

    def __init__(self):
        self.children = []

    def start(self, name, args, **kw):
        p = subprocess.Popen(args, **kw)
        self.children.append((name, p))
        return p

    def stop_all(self):
        for _, p in reversed(self.children):
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        deadline = time.time() + 5
        for _, p in reversed(self.children):
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except OSError:
            pass
    return total / CLK_TCK


def children_of(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def descendants_of(pid):
    out = []
    for child in children_of(pid):
        out += [child, *descendants_of(child)]
    return out


def metric_sum(port, name):
    """The sum of a metric's samples on a gateway's admin listener (0 when absent)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    total = 0.0
    for line in data.decode(errors="replace").splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def peak_rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def stop(p):
    p.send_signal(signal.SIGINT)
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path


class Bench:
    def __init__(self, work):
        self.work = work
        self.procs = Procs()
        self.admin_of = {}
        self.bin = os.environ.get("CHATGATE_BIN") or os.path.join(ROOT, "target", "release", "chatgate")
        self.loadgen_bin = os.environ["LOADGEN"]
        self.floor_bin = os.environ["FLOOR"]
        self.rows = {}

    # ---- processes -------------------------------------------------------------------
    def start_redis(self):
        self.redis_port = free_port()
        self.procs.start(
            "redis",
            ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.work],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        assert wait_port(self.redis_port), "redis-server did not start"

    def start_postgres(self):
        """A private PostgreSQL server (trust auth, loopback only) for the record step;
        initdb and postgres refuse root, so they run as the postgres user when we are root."""
        bindir = sorted(d for d in os.listdir("/usr/lib/postgresql"))[-1]
        bindir = os.path.join("/usr/lib/postgresql", bindir, "bin")
        data = os.path.join(self.work, "pg")
        os.makedirs(data)
        as_pg = []
        if os.geteuid() == 0:
            shutil.chown(data, "postgres", "postgres")
            os.chmod(self.work, 0o755)
            as_pg = ["runuser", "-u", "postgres", "--"]
        subprocess.run([*as_pg, os.path.join(bindir, "initdb"), "-D", data, "-A", "trust",
                        "-U", "postgres"], check=True, capture_output=True)
        port = free_port()
        p = self.procs.start("postgres", [*as_pg, os.path.join(bindir, "postgres"), "-D", data,
                                      "-p", str(port), "-k", data, "-c", "listen_addresses=127.0.0.1"],
                         stdout=subprocess.DEVNULL,
                         stderr=open(os.path.join(self.work, "pg.log"), "w"))
        assert wait_port(port, 30), "postgres did not start"
        return port, p

    def start_simulator(self, extra=()):
        port = free_port()
        p = self.procs.start(
            "simulator",
            [self.bin, "simulate", "--listen", f"127.0.0.1:{port}", *extra],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.work, f"sim-{port}.log"), "w"),
            env={**os.environ, "RUST_LOG": "warn"},
        )
        assert wait_port(port), "simulator did not start"
        return port, p

    def gateway_config(self, port, admin, sim_port, extra=""):
        w = self.work
        return write(os.path.join(w, f"gw-{port}.yaml"), extra + f"""listen: ["127.0.0.1:{port}"]
admin_listen: "127.0.0.1:{admin}"
pingora:
  threads: 2
  grace_period_seconds: 0
  graceful_shutdown_timeout_seconds: 1
  upgrade_sock: {w}/upgrade-{port}.sock
  pid_file: {w}/chatgate-{port}.pid
  upstream_keepalive_pool_size: 20000
auth:
  token_ttl: 7d
  jwt:
    secret_env: CHATGATE_JWT_SECRET
  credentials:
    backend: redis
    redis:
      url: redis://127.0.0.1:{self.redis_port}/0
      key_prefix: "bench:"
# Every load client connects from 127.0.0.1: no per-address connection cap.
limits:
  max_connections: 16000
  max_connections_per_ip: 0
# The /auth flood must reach the password hash, not the failed-login lockout.
rate_limits:
{self.chat_limits()}
  auth:
    failures_per_username: 0
    failures_per_ip: 0
    failures_per_username_global: 0
upstreams:
  main:
    endpoints: ["127.0.0.1:{sim_port}"]
routes:
  - path: /chatCompletion
    kind: chat
    upstream: main
    model: bench-model
    system_prompt: "You are the openEuler community assistant, your name is XiaoZhi."
  - path: /chatCompletionStream
    kind: chat_stream
    upstream: main
    model: bench-model
    system_prompt: "You are the openEuler community assistant, your name is XiaoZhi."
""")

    @staticmethod
    def chat_limits():
        if LIMITS == "on":
            return ("  requests_per_minute: 100000000\n  tokens_per_minute: 100000000000\n"
                    "  tokens_per_day: 100000000000")
        return "  requests_per_minute: 0\n  tokens_per_minute: 0\n  tokens_per_day: 0"

    def start_gateway(self, sim_port, rust_log, extra=""):
        port, admin = free_port(), free_port()
        cfg = self.gateway_config(port, admin, sim_port, extra)
        env = {**os.environ, "CHATGATE_JWT_SECRET": JWT_SECRET, "RUST_LOG": rust_log}
        logf = open(os.path.join(self.work, f"gw-{port}.log"), "w")
        p = self.procs.start("gateway", [self.bin, "serve", "--config", cfg], env=env,
                             stdout=logf, stderr=logf)
        assert wait_port(port), f"gateway did not start, see {logf.name}"
        self.admin_of[port] = admin
        return port, p, cfg

    def add_user_and_login(self, gw_port, cfg):
        env = {**os.environ, "CHATGATE_JWT_SECRET": JWT_SECRET}
        subprocess.run([self.bin, "users", "add", "bench", "--config", cfg], input=b"bench-password",
                       env=env, check=False, capture_output=True)
        form = "username=bench&password=bench-password"
        req = ("POST /auth HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
               f"Content-Length: {len(form)}\r\nConnection: close\r\n\r\n{form}")
        with socket.create_connection(("127.0.0.1", gw_port), timeout=10) as s:
            s.sendall(req.encode())
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        m = re.search(rb'"accessToken"\s*:\s*"([^"]+)"', data)
        assert m, f"login failed: {data[:300]!r}"
        return m.group(1).decode()

    def start_nginx(self, sim_port, access_log=False):
        port = free_port()
        w = os.path.join(self.work, f"nginx-{port}")
        os.makedirs(w)
        log_line = f"access_log {w}/access.log;" if access_log else "access_log off;"
        conf = write(os.path.join(w, "nginx.conf"), f"""worker_processes 2;
daemon off;
master_process on;
pid {w}/nginx.pid;
error_log {w}/nginx-error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 30000; }}
http {{
  {log_line}
  client_body_temp_path {w}/nginx-body;
  proxy_temp_path {w}/nginx-proxy;
  fastcgi_temp_path {w}/nginx-fcgi;
  uwsgi_temp_path {w}/nginx-uwsgi;
  scgi_temp_path {w}/nginx-scgi;
  upstream sim {{ server 127.0.0.1:{sim_port}; keepalive 1024; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://sim;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
""")
        p = self.procs.start("nginx", ["nginx", "-c", conf, "-e", f"{w}/nginx-error.log"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_port(port), "nginx did not start"
        return port, p

    def start_floor(self, sim_port):
        port = free_port()
        p = self.procs.start("floor", [self.floor_bin, f"127.0.0.1:{port}", f"127.0.0.1:{sim_port}"],
                             stdout=subprocess.DEVNULL,
                             stderr=open(os.path.join(self.work, "floor.log"), "w"),
                             env={**os.environ, "RUST_LOG": "warn"})
        assert wait_port(port), "the floor proxy did not start"
        return port, p

    # ---- load ------------------------------------------------------------------------
    def wrk(self, port, path, body, auth=None, seconds=DURATION, connections=CONNECTIONS,
            content_type="application/json"):
        body_file = write(os.path.join(self.work, f"body-{abs(hash(body))}.txt"), body)
        env = {**os.environ, "BODY_FILE": body_file, "AUTH_HEADER": auth or "",
               "CONTENT_TYPE": content_type}
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
             "-s", os.path.join(HERE, "post.lua"), f"http://127.0.0.1:{port}{path}"],
            capture_output=True, text=True, env=env, timeout=seconds + 60,
        ).stdout
        m = re.search(r"WRKJSON (\{.*\})", out)
        assert m, f"wrk printed no summary:\n{out}"
        return json.loads(m.group(1))

    def loadgen(self, *args, timeout=600):
        out = subprocess.run([self.loadgen_bin, *map(str, args)], capture_output=True, text=True,
                             timeout=timeout)
        lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
        assert lines, f"loadgen printed nothing: {out.stderr}"
        return json.loads(lines[-1])

    def body_file(self, name, body):
        return write(os.path.join(self.work, name), body)

    # ---- steps -----------------------------------------------------------------------
    def closed_loop(self, label, port, path, body, pids, auth=None):
        before = cpu_seconds(pids())
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        r = self.wrk(port, path, body, auth)
        cpu = cpu_seconds(pids()) - before
        waited = resource.getrusage(resource.RUSAGE_CHILDREN)
        r["cpu_per_1k"] = cpu / max(r["requests"], 1) * 1000
        # wrk is the only child waited for meanwhile.
        r["wrk_cpu_per_1k"] = ((waited.ru_utime + waited.ru_stime - children.ru_utime - children.ru_stime)
                               / max(r["requests"], 1) * 1000)
        r["rps"] = r["requests"] / r["seconds"]
        log(f"{label}: {r}")
        return r

    def run(self):
        self.start_redis()
        sim_port, sim = self.start_simulator()
        nginx_port, nginx = self.start_nginx(sim_port)
        # The floor takes part in the closed-loop and fixed-rate steps only.
        floor_port, floor = (self.start_floor(sim_port) if {"closed", "fixed"} & set(STEPS)
                             else (None, None))
        gw_port, gw, gw_cfg = self.start_gateway(sim_port, "warn")
        token = self.add_user_and_login(gw_port, gw_cfg)
        bearer = f"Bearer {token}"
        nginx_pids = lambda: [nginx.pid, *children_of(nginx.pid)]
        gw_pids = lambda: [gw.pid]
        sim_pids = lambda: [sim.pid]
        oa = "/v1/chat/completions"

        # Warm-up: connections, pools, caches.
        self.wrk(gw_port, "/chatCompletion", CHAT_BODY, bearer, seconds=2)
        self.wrk(nginx_port, oa, OPENAI_BODY, seconds=2)
        if floor:
            self.wrk(floor_port, oa, OPENAI_BODY, seconds=2)

        res = {}
        if "closed" in STEPS:
            self.closed_steps(res, sim_port, nginx_port, floor_port, gw_port, bearer, sim_pids,
                              nginx_pids, lambda: [floor.pid], gw_pids)
        fixed, streams = {}, {}
        if "fixed" in STEPS:
            self.fixed_steps(fixed, sim_port, floor_port, gw_port, bearer)
        # Its idle upstream connections would count against the simulator's fds.
        if floor:
            stop(floor)
        if "streams" in STEPS:
            self.stream_steps(streams, sim_port, gw_port, gw, bearer)
        flood = self.flood_step(gw_port, bearer) if "flood" in STEPS else None
        record = self.record_step(sim_port, sim, gw_port, gw, bearer) if "record" in STEPS else None
        access = (self.access_log_step(sim_port, nginx_port, nginx_pids, gw_port, gw, bearer)
                  if "accesslog" in STEPS else None)
        memory = self.stream_memory_step(sim_port, bearer) if "streammem" in STEPS else None
        return self.table(res, fixed, streams, flood, record, access, memory)

    def access_log_step(self, sim_port, nginx_port, nginx_pids, gw_port, gw, bearer, rounds=3):
        """CPU per request with the access log on vs off: chatgate at RUST_LOG=info (its
        default) against the RUST_LOG=warn gateway, and nginx with its access log on against
        the one with it off, rounds alternated, all in one run."""
        on_port, on, _ = self.start_gateway(sim_port, "info")
        ng_port, ng = self.start_nginx(sim_port, access_log=True)
        ng_pids = lambda: [ng.pid, *children_of(ng.pid)]
        oa = "/v1/chat/completions"
        self.wrk(on_port, "/chatCompletion", CHAT_BODY, bearer, seconds=2)
        self.wrk(ng_port, oa, OPENAI_BODY, seconds=2)
        runs = {"off": [], "on": [], "nginx_off": [], "nginx_on": []}
        for _ in range(rounds):
            runs["off"].append(self.closed_loop("access log off", gw_port, "/chatCompletion",
                                                CHAT_BODY, lambda: [gw.pid], bearer))
            runs["on"].append(self.closed_loop("access log on", on_port, "/chatCompletion",
                                               CHAT_BODY, lambda: [on.pid], bearer))
            runs["nginx_off"].append(self.closed_loop("nginx access log off", nginx_port, oa,
                                                      OPENAI_BODY, nginx_pids))
            runs["nginx_on"].append(self.closed_loop("nginx access log on", ng_port, oa,
                                                     OPENAI_BODY, ng_pids))
        time.sleep(0.5)  # the writer's last batch
        with open(os.path.join(self.work, f"gw-{on_port}.log")) as f:
            lines = sum(1 for l in f if '"target":"access"' in l)
        stop(on)
        stop(ng)
        return runs, lines

    def held_streams(self, pids, port, path, body_file, n, auth=()):
        """Runs n streams through one target and samples its RSS (all its processes) while
        they are open: (RSS before, highest RSS sampled, loadgen's summary)."""
        ramp = max(1.0, n / 2000)
        before = sum(rss_mib(p) for p in pids())
        args = [self.loadgen_bin, "stream", f"127.0.0.1:{port}", path, body_file, n, ramp, PACE_MS,
                *auth]
        lg = subprocess.Popen(list(map(str, args)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
        peak = before
        while lg.poll() is None:
            try:
                peak = max(peak, sum(rss_mib(p) for p in pids()))
            except OSError:
                pass
            time.sleep(0.1)
        out, err = lg.communicate()
        lines = [l for l in out.splitlines() if l.startswith("{")]
        assert lines, f"loadgen printed nothing: {err}"
        return before, peak, json.loads(lines[-1])

    def stream_memory_step(self, sim_port, bearer):
        """Memory per open stream, same run: RSS growth of a fresh nginx, a fresh floor and a
        fresh chatgate while n streams are open, divided by n."""
        oa = "/v1/chat/completions"
        sfile, soa_file = self.stream_body_files()
        rows = []
        for wanted in STREAMS:
            n = min(wanted, (FD_LIMIT - 200) // 2)
            row = {"streams": n}
            port, p = self.start_nginx(sim_port)
            time.sleep(0.5)
            row["nginx"] = self.held_streams(lambda: [p.pid, *children_of(p.pid)], port, oa,
                                             soa_file, n)
            stop(p)
            port, p = self.start_floor(sim_port)
            row["floor"] = self.held_streams(lambda: [p.pid], port, oa, soa_file, n)
            stop(p)
            port, p, _ = self.start_gateway(sim_port, "warn")
            row["chatgate"] = self.held_streams(lambda: [p.pid], port, "/chatCompletionStream",
                                                sfile, n, (f"Authorization: {bearer}",))
            stop(p)
            log(f"stream memory {n}: {row}")
            rows.append(row)
        return rows

    def memory_table(self, lines, rows):
        lines.append(f"\n### Memory per open stream ({STREAM_CHUNKS} chunks, {PACE_MS} ms apart; "
                     "fresh process per target; RSS growth while the streams are open / streams)\n")
        lines.append("| streams | nginx KiB/stream | floor KiB/stream | chatgate KiB/stream | chatgate / nginx | "
                     "errors nginx / floor / chatgate | gap p99 ms nginx / floor / chatgate | RSS before → peak MiB nginx / floor / chatgate |")
        lines.append("|---:|---:|---:|---:|---:|---|---|---|")
        for row in rows:
            n = row["streams"]
            per = {k: (row[k][1] - row[k][0]) * 1024 / n for k in ("nginx", "floor", "chatgate")}
            errs = " / ".join(str(row[k][2]["errors"]) for k in ("nginx", "floor", "chatgate"))
            gaps = " / ".join(f"{row[k][2]['gap_p99_us'] / 1000:.2f}" for k in ("nginx", "floor", "chatgate"))
            rss = " / ".join(f"{row[k][0]:.0f} → {row[k][1]:.0f}" for k in ("nginx", "floor", "chatgate"))
            lines.append(f"| {n} | {per['nginx']:.1f} | {per['floor']:.1f} | {per['chatgate']:.1f} | "
                         f"{per['chatgate'] / max(per['nginx'], 1e-9):.2f}× | {errs} | {gaps} | {rss} |")

    def record_step(self, sim_port, sim, gw_port, gw, bearer, rounds=RECORD_ROUNDS):
        """Chat throughput and p99 with the conversation record on vs off: the same load
        alternated between this gateway (record off) and one writing to PostgreSQL. The
        order within a round alternates too (off, on; then on, off), so a load change on
        the shared machine does not always fall on the same side. Each run also measures
        the CPU per request of chatgate, PostgreSQL and the simulator separately."""
        pg_port, pg = self.start_postgres()
        spool = os.path.join(self.work, "spool")
        extra = (f"conversation_log:\n  url: postgres://postgres@127.0.0.1:{pg_port}/postgres\n"
                 f"  spool_dir: {spool}\n")
        on_port, on, _ = self.start_gateway(sim_port, "warn", extra)
        body = conversation_body(RECORD_MESSAGES_KB) if RECORD_MESSAGES_KB else CHAT_BODY
        self.wrk(on_port, "/chatCompletion", body, bearer, seconds=2)
        pg_pids = lambda: [pg.pid, *descendants_of(pg.pid)]
        gateways = {"off": (gw_port, gw), "on": (on_port, on)}
        runs = {"off": [], "on": []}
        for i in range(rounds):
            for side in (("off", "on") if i % 2 == 0 else ("on", "off")):
                port, p = gateways[side]
                pg_before, sim_before = cpu_seconds(pg_pids()), cpu_seconds([sim.pid])
                run = self.closed_loop(f"record {side}", port, "/chatCompletion", body,
                                       lambda: [p.pid], bearer)
                n = max(run["requests"], 1)
                run["pg_cpu_per_1k"] = (cpu_seconds(pg_pids()) - pg_before) / n * 1000
                run["sim_cpu_per_1k"] = (cpu_seconds([sim.pid]) - sim_before) / n * 1000
                runs[side].append(run)
        time.sleep(2)  # the writer's last batch
        rows = subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(pg_port), "-U", "postgres",
                               "-tAc", "select count(*) from chatgate_conversations"],
                              capture_output=True, text=True).stdout.strip()
        # The writer's capacity: records written per second spent in batch writes (the
        # writer is idle the rest of the time).
        admin = self.admin_of[on_port]
        written = metric_sum(admin, "chatgate_conversation_log_written_total")
        busy = metric_sum(admin, "chatgate_conversation_log_write_seconds_sum")
        capacity = written / busy if busy > 0 else 0.0
        sent = sum(r["requests"] for r in runs["on"])
        stop(on)
        return runs["off"], runs["on"], rows, sent, capacity

    def closed_steps(self, res, sim_port, nginx_port, floor_port, gw_port, bearer, sim_pids,
                     nginx_pids, floor_pids, gw_pids):
        oa = "/v1/chat/completions"
        res["direct"] = self.closed_loop("direct", sim_port, oa, OPENAI_BODY, sim_pids)
        res["nginx"] = self.closed_loop("nginx", nginx_port, oa, OPENAI_BODY, nginx_pids)
        res["floor"] = self.closed_loop("floor", floor_port, oa, OPENAI_BODY, floor_pids)
        res["chatgate"] = self.closed_loop("chatgate", gw_port, "/chatCompletion", CHAT_BODY, gw_pids,
                                           bearer)
        if ACCESS_LOG in ("info", "both"):
            gw2_port, gw2, _ = self.start_gateway(sim_port, "info")
            self.wrk(gw2_port, "/chatCompletion", CHAT_BODY, bearer, seconds=2)
            res["chatgate_info"] = self.closed_loop("chatgate (RUST_LOG=info)", gw2_port,
                                                    "/chatCompletion", CHAT_BODY, lambda: [gw2.pid],
                                                    bearer)
            stop(gw2)

    def fixed_steps(self, fixed, sim_port, floor_port, gw_port, bearer):
        """Fixed rates, open loop."""
        oa = "/v1/chat/completions"
        chat_file = self.body_file("chat.json", CHAT_BODY)
        oa_file = self.body_file("openai.json", OPENAI_BODY)
        for rate in RATES:
            d = self.loadgen("fixed", f"127.0.0.1:{sim_port}", oa, oa_file, rate, DURATION, 64)
            f = self.loadgen("fixed", f"127.0.0.1:{floor_port}", oa, oa_file, rate, DURATION, 64)
            g = self.loadgen("fixed", f"127.0.0.1:{gw_port}", "/chatCompletion", chat_file, rate,
                             DURATION, 64, f"Authorization: {bearer}")
            log(f"fixed {rate}/s: direct {d} floor {f} chatgate {g}")
            fixed[rate] = (d, f, g)

    def stream_body_files(self):
        """The paced stream request, as a chat body and as the same request in OpenAI form
        (for nginx, the floor and the direct path): its two file names."""
        stream_body = json.dumps([{"role": "user", "content": f"#sim reply=lorem:{STREAM_CHUNKS * 4} chunk_size=4 chunk_delay_ms={PACE_MS}\nHello"}])
        stream_oa = json.dumps({"model": "bench-model", "stream": True,
                                "messages": json.loads(stream_body)})
        return (self.body_file("stream.json", stream_body),
                self.body_file("stream-openai.json", stream_oa))

    def stream_steps(self, streams, sim_port, gw_port, gw, bearer):
        oa = "/v1/chat/completions"
        sfile, soa_file = self.stream_body_files()
        for wanted in STREAMS:
            # The gateway holds two sockets per stream (client and upstream side).
            n = min(wanted, (FD_LIMIT - 200) // 2)
            if n < wanted:
                log(f"{wanted} streams need {2 * wanted + 200} fds; the hard limit is {FD_LIMIT}: running {n}")
            ramp = max(1.0, n / 2000)
            d = self.loadgen("stream", f"127.0.0.1:{sim_port}", oa, soa_file, n, ramp, PACE_MS)
            # A fresh floor per step: its peak RSS is this step's, and the idle upstream
            # connections it keeps afterwards would take the simulator's fds from chatgate's.
            floor_port, floor = self.start_floor(sim_port)
            f = self.loadgen("stream", f"127.0.0.1:{floor_port}", oa, soa_file, n, ramp, PACE_MS)
            f["peak_rss_mib"] = peak_rss_mib(floor.pid)
            stop(floor)
            rss_before = rss_mib(gw.pid)
            g = self.loadgen("stream", f"127.0.0.1:{gw_port}", "/chatCompletionStream", sfile, n,
                             ramp, PACE_MS, f"Authorization: {bearer}")
            g["peak_rss_mib"] = peak_rss_mib(gw.pid)
            g["rss_before_mib"] = rss_before
            log(f"streams {n}: direct {d} floor {f} chatgate {g}")
            streams[wanted] = (n, d, f, g)

    def flood_step(self, gw_port, bearer):
        """Chat p99 while /auth is flooded (wrong passwords: each costs a full hash)."""
        chat_file = self.body_file("chat.json", CHAT_BODY)
        flood_rate = RATES[0] if RATES else 500
        quiet = self.loadgen("fixed", f"127.0.0.1:{gw_port}", "/chatCompletion", chat_file,
                             flood_rate, DURATION, 64, f"Authorization: {bearer}")
        flood = subprocess.Popen(
            ["wrk", "-t1", "-c16", f"-d{DURATION + 4}s", "--timeout", "10s",
             "-s", os.path.join(HERE, "post.lua"), f"http://127.0.0.1:{gw_port}/auth"],
            env={**os.environ,
                 "BODY_FILE": self.body_file("auth.txt", "username=bench&password=wrong-password"),
                 "CONTENT_TYPE": "application/x-www-form-urlencoded", "AUTH_HEADER": ""},
            stdout=subprocess.PIPE, text=True,
        )
        time.sleep(2)
        flooded = self.loadgen("fixed", f"127.0.0.1:{gw_port}", "/chatCompletion", chat_file,
                               flood_rate, DURATION, 64, f"Authorization: {bearer}")
        flood_out = flood.communicate(timeout=DURATION + 60)[0]
        m = re.search(r"WRKJSON (\{.*\})", flood_out)
        flood_stats = json.loads(m.group(1)) if m else {}
        log(f"auth flood: quiet {quiet} flooded {flooded} flood {flood_stats}")
        return flood_rate, quiet, flooded, flood_stats

    # ---- report ----------------------------------------------------------------------
    def table(self, res, fixed, streams, flood, record=None, access=None, memory=None):
        ms = lambda us: f"{us / 1000:.2f}"
        lines = []
        if res:
            self.closed_table(lines, res)
        if fixed:
            self.fixed_table(lines, fixed)
        if streams:
            self.stream_table(lines, streams)
        if flood:
            self.flood_table(lines, *flood)
        if record:
            self.record_table(lines, *record)
        if access:
            self.access_log_table(lines, *access)
        if memory:
            self.memory_table(lines, memory)
        return "\n".join(lines)

    def access_log_table(self, lines, runs, logged):
        lines.append(f"\n### Access log on vs off (wrk closed loop, {CONNECTIONS} connections, "
                     f"{DURATION} s per round, rounds alternated; CPU s per 1,000 requests)\n")
        lines.append("| round | chatgate off | chatgate on | on / off | nginx off | nginx on | "
                     "chatgate req/s off / on |")
        lines.append("|---:|---:|---:|---:|---:|---:|---:|")
        for i, (f, n, gf, gn) in enumerate(zip(runs["off"], runs["on"], runs["nginx_off"],
                                              runs["nginx_on"]), 1):
            lines.append(f"| {i} | {f['cpu_per_1k']:.3f} | {n['cpu_per_1k']:.3f} | "
                         f"{n['cpu_per_1k'] / max(f['cpu_per_1k'], 1e-9):.2f} | "
                         f"{gf['cpu_per_1k']:.3f} | {gn['cpu_per_1k']:.3f} | "
                         f"{f['rps']:.0f} / {n['rps']:.0f} |")
        cpu = lambda key: (sum(r["cpu_per_1k"] * r["requests"] for r in runs[key])
                           / max(sum(r["requests"] for r in runs[key]), 1))
        off, on = cpu("off"), cpu("on")
        sent = sum(r["requests"] for r in runs["on"])
        lines.append(f"\nAccess log share of chatgate's CPU per request, (on − off) / on: "
                     f"**{(on - off) / max(on, 1e-9) * 100:.1f}%** (target ≤ 5%); on / off {on / max(off, 1e-9):.2f}; "
                     f"per line {(on - off) * 1000:.1f} µs; nginx on / off {cpu('nginx_on') / max(cpu('nginx_off'), 1e-9):.2f}; "
                     f"access lines written {logged} for {sent} requests (warm-up included)\n")

    def record_table(self, lines, off_runs, on_runs, rows, sent, capacity):
        ms = lambda us: f"{us / 1000:.2f}"
        us = lambda cpu_per_1k: f"{cpu_per_1k * 1000:.1f}"
        lines.append(f"\n### Conversation record on vs off (wrk closed loop, {CONNECTIONS} connections, "
                     f"{DURATION} s per run, {len(on_runs)} rounds, order alternated; CPU in µs per request; "
                     + (f"a {RECORD_MESSAGES_KB} KiB conversation per request)\n" if RECORD_MESSAGES_KB
                        else "a one-line question per request)\n"))
        lines.append("| round | off req/s | on req/s | on / off | off p99 ms | on p99 ms | "
                     "chatgate CPU off / on | PostgreSQL CPU off / on | simulator CPU off / on | "
                     "wrk CPU off / on | all CPU off / on |")
        lines.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        ratios, cpu_ratios = [], []
        total = lambda r: r["cpu_per_1k"] + r["pg_cpu_per_1k"] + r["sim_cpu_per_1k"] + r["wrk_cpu_per_1k"]
        for i, (f, n) in enumerate(zip(off_runs, on_runs), 1):
            ratios.append(n["rps"] / max(f["rps"], 1e-9))
            cpu_ratios.append(total(f) / max(total(n), 1e-9))
            lines.append(f"| {i} | {f['rps']:.0f} | {n['rps']:.0f} | {ratios[-1]:.2f} | "
                         f"{ms(f['p99_us'])} | {ms(n['p99_us'])} | {us(f['cpu_per_1k'])} / {us(n['cpu_per_1k'])} | "
                         f"{us(f['pg_cpu_per_1k'])} / {us(n['pg_cpu_per_1k'])} | "
                         f"{us(f['sim_cpu_per_1k'])} / {us(n['sim_cpu_per_1k'])} | "
                         f"{us(f['wrk_cpu_per_1k'])} / {us(n['wrk_cpu_per_1k'])} | "
                         f"{us(total(f))} / {us(total(n))} |")
        med = lambda runs, key: statistics.median(r[key] for r in runs)
        own = med(on_runs, "cpu_per_1k") - med(off_runs, "cpu_per_1k")
        # All of PostgreSQL's CPU (during the off runs too: checkpoints and autovacuum
        # catching up) per request recorded.
        pg_cost = (sum(r["pg_cpu_per_1k"] * r["requests"] for r in off_runs + on_runs)
                   / max(sum(r["requests"] for r in on_runs), 1))
        overall = sum(r["rps"] for r in on_runs) / max(sum(r["rps"] for r in off_runs), 1e-9)
        lines.append(f"\nThroughput with the record on / off: median of the rounds **{statistics.median(ratios):.2f}** "
                     f"(rounds {min(ratios):.2f}-{max(ratios):.2f}; all requests {overall:.2f}; target ≥ 0.90). "
                     f"CPU-bound estimate, all processes' CPU per request off / on (what the ratio would be "
                     f"were the two cores busy with these processes only), median of the rounds: "
                     f"{statistics.median(cpu_ratios):.2f} "
                     f"(rounds {min(cpu_ratios):.2f}-{max(cpu_ratios):.2f}). "
                     f"The record's CPU per request: chatgate **{own * 1000:+.1f} µs** (medians, on − off), "
                     f"PostgreSQL **{pg_cost * 1000:.1f} µs** (all its CPU in the step / requests recorded). "
                     f"Rows in PostgreSQL {rows} for {sent} answered requests (warm-up included in the rows); "
                     f"the writer wrote **{capacity:,.0f} records per second of batch-write time** "
                     f"(target ≥ 5,000)\n")

    def closed_table(self, lines, res):
        ms = lambda us: f"{us / 1000:.2f}"
        lines.append(f"### Non-streaming, closed loop (wrk, 1 thread, {CONNECTIONS} connections, {DURATION} s)\n")
        lines.append("| target | req/s | p50 ms | p99 ms | errors | CPU s / 1,000 req |")
        lines.append("|---|---:|---:|---:|---:|---:|")
        names = [("direct", "direct to simulator"), ("nginx", "nginx proxy_pass"),
                 ("floor", "floor: bare Pingora proxy_pass"), ("chatgate", "chatgate (RUST_LOG=warn)"), ("chatgate_info", "chatgate (RUST_LOG=info, access log)")]
        for key, name in names:
            if key not in res:
                continue
            r = res[key]
            cpu = f"{r['cpu_per_1k']:.3f}" + (" (simulator)" if key == "direct" else "")
            lines.append(f"| {name} | {r['rps']:.0f} | {ms(r['p50_us'])} | {ms(r['p99_us'])} | "
                         f"{r['errors'] + r['non2xx']} | {cpu} |")
        cpu = lambda key: max(res[key]["cpu_per_1k"], 1e-9)
        lines.append(f"\nCPU per request, chatgate / nginx: **{cpu('chatgate') / cpu('nginx'):.2f}×** "
                     f"(target ≤ 1.5×); floor / nginx: {cpu('floor') / cpu('nginx'):.2f}×; "
                     f"chatgate / floor: {cpu('chatgate') / cpu('floor'):.2f}×\n")

    def fixed_table(self, lines, fixed):
        ms = lambda us: f"{us / 1000:.2f}"

        lines.append("### Added latency at fixed rates (open loop, 64 connections; a request late for its slot counts from the slot)\n")
        lines.append("| rate | direct p50 / p99 ms | chatgate p50 / p99 ms | added p50 ms | added p99 ms | floor added p50 / p99 ms | errors |")
        lines.append("|---:|---:|---:|---:|---:|---:|---:|")
        for rate, (d, f, g) in fixed.items():
            lines.append(f"| {rate}/s | {ms(d['p50_us'])} / {ms(d['p99_us'])} | {ms(g['p50_us'])} / {ms(g['p99_us'])} | "
                         f"{ms(g['p50_us'] - d['p50_us'])} | {ms(g['p99_us'] - d['p99_us'])} | "
                         f"{ms(f['p50_us'] - d['p50_us'])} / {ms(f['p99_us'] - d['p99_us'])} | "
                         f"{d['errors'] + f['errors'] + g['errors']} |")

    def stream_table(self, lines, streams):
        ms = lambda us: f"{us / 1000:.2f}"
        lines.append(f"\n### Streaming through chatgate ({STREAM_CHUNKS} chunks, {PACE_MS} ms apart; streams opened at 2,000/s; \"all streams open\": gaps that ended after the last stream was opened)\n")
        lines.append("| streams | errors | peak concurrent | TTFE p50 / p99 ms (direct) | TTFE p50 / p99 ms (chatgate) | added gap p50 ms | added gap p99 ms | added gap p99 ms, all streams open | gateway peak RSS MiB | floor: errors, added gap p99 ms (all open), peak RSS MiB |")
        lines.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for wanted, (n, d, f, g) in streams.items():
            shown = f"{n}" if n == wanted else f"{n} ({wanted} asked; fd limit {FD_LIMIT})"
            lines.append(f"| {shown} | {g['errors']} (direct {d['errors']}) | {g['peak_concurrent']} | "
                         f"{ms(d['ttfe_p50_us'])} / {ms(d['ttfe_p99_us'])} | {ms(g['ttfe_p50_us'])} / {ms(g['ttfe_p99_us'])} | "
                         f"{ms(g['gap_p50_us'] - d['gap_p50_us'])} | {ms(g['gap_p99_us'] - d['gap_p99_us'])} | "
                         f"{ms(g['steady_gap_p99_us'] - d['steady_gap_p99_us'])} | "
                         f"{g['peak_rss_mib']:.0f} | {f['errors']}, {ms(f['gap_p99_us'] - d['gap_p99_us'])} "
                         f"({ms(f['steady_gap_p99_us'] - d['steady_gap_p99_us'])}), {f['peak_rss_mib']:.0f} |")

    def flood_table(self, lines, flood_rate, quiet, flooded, flood_stats):
        ms = lambda us: f"{us / 1000:.2f}"
        lines.append(f"\n### Chat under an /auth flood ({flood_rate} chat req/s, open loop)\n")
        lines.append("| | chat p50 ms | chat p99 ms | chat errors | /auth req/s (flood) |")
        lines.append("|---|---:|---:|---:|---:|")
        lines.append(f"| without flood | {ms(quiet['p50_us'])} | {ms(quiet['p99_us'])} | {quiet['errors']} | – |")
        frps = flood_stats.get("requests", 0) / max(flood_stats.get("seconds", 1), 1e-9)
        lines.append(f"| with flood | {ms(flooded['p50_us'])} | {ms(flooded['p99_us'])} | {flooded['errors']} | {frps:.0f} |")
        lines.append(f"\nFlooded / quiet chat p99: **{flooded['p99_us'] / max(quiet['p99_us'], 1):.2f}×** (target ≤ 2×)")


def machine():
    cpu = next((l.split(":", 1)[1].strip() for l in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                if l.startswith("Model name")), platform.processor())
    mem = subprocess.run(["free", "-g"], capture_output=True, text=True).stdout.splitlines()[1].split()[1]
    load = os.getloadavg()
    return (f"{os.cpu_count()} cores ({cpu}), {mem} GiB RAM, Linux {platform.release()}; "
            f"load average before the run {load[0]:.2f}")


def main():
    work = tempfile.mkdtemp(prefix="chatgate-bench-")
    bench = Bench(work)
    header = (f"Run {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} on {machine()}; "
              f"chat limits {LIMITS} (LIMITS).\n")
    try:
        table = bench.run()
    finally:
        bench.procs.stop_all()
    print(header)
    print(table)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
