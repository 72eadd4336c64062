"""`python -m core.serve` over 2 gloo ranks on loopback (core.serve.ranks): rank 0 serves HTTP and drives rank 1.

Under torchrun: chat and completions, streaming and not, through the official `openai` client give the greedy text
of one process (the offline engine, float32, on the same embedded default); so do concurrent requests, a seeded
sampled one among them; only rank 0 listens on the HTTP port; an idle follower sleeps (little CPU) and an idle longer
than the collective timeout is survived (heartbeats); SIGTERM to rank 0 ends every rank with status 0 (torchrun
exits 0 only if every rank did). With the ranks launched by the test (torchrun's environment variables): MTP
speculative decoding gives the greedy text, a follower ignores SIGTERM (rank 0 decides when the ranks stop), and a
follower killed outright ends rank 0's server within a heartbeat with one line and status 2. Every process is
started in its own session and killed on the way out. (Steps over gloo on a shared 2-core machine are slow, so
requests are a few tokens each.)"""

from __future__ import annotations

import asyncio
import os
import pickle
import random
import signal
import string
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")

from core.engine.engine import Engine, EngineConfig  # noqa: E402
from core.engine.llm import LLM  # noqa: E402
from core.serve.ranks import LeaderEngine, agree_cache_blocks, follow  # noqa: E402
from tests.helpers import fresh_seed  # noqa: E402
from tests.serve_support import MODEL, ROOT, free_port  # noqa: E402

MAX_MODEL_LEN = 256
OPTIONS = ("--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory", "8MiB",
           "--shutdown-timeout", "2", "--log-level", "warning")
START_TIMEOUT = 240.0
DIST_TIMEOUT = 10  # seconds: the ranks' collective timeout (so rank 0 sends a heartbeat every 2.5 s when idle)


def _env(**extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DSV3_DIST_TIMEOUT": str(DIST_TIMEOUT)}
    env.pop("DSV3_DEBUG", None)
    return {**env, **extra}


class Launch:
    """Processes started in their own sessions (the whole launch is killed on the way out), logs in temp files."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"

    def spawn(self, cmd: list[str], env: dict) -> subprocess.Popen:
        log = tempfile.NamedTemporaryFile(prefix="serve-ranks-", suffix=".log", delete=False)
        self.logs.append(Path(log.name))
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def log(self, n: int = 0) -> str:
        return self.logs[n].read_text(errors="replace")

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            for n, p in enumerate(self.procs):
                if p.poll() is not None:
                    raise RuntimeError(f"process {n} exited with status {p.returncode}:\n{self.log(n)[-3000:]}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"the server did not become healthy in {START_TIMEOUT} s:\n{self.log()[-3000:]}")

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
        for log in self.logs:
            log.unlink(missing_ok=True)


def torchrun_server() -> tuple[Launch, subprocess.Popen]:
    launch = Launch()
    proc = launch.spawn([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                         "127.0.0.1", "--master-port", str(free_port()), "-m", "core.serve", "--port",
                         str(launch.port), *OPTIONS], _env())
    return launch, proc


def own_ranks(*extra: str) -> Launch:
    """Rank 0 and rank 1 started by the test with the environment torchrun would give them."""
    launch, master = Launch(), str(free_port())
    for rank in range(2):
        launch.spawn([sys.executable, "-m", "core.serve", "--port", str(launch.port), *OPTIONS, *extra],
                     _env(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=master))
    return launch


# -- processes seen through /proc -------------------------------------------------------------------------------------

def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def rank_of(pid: int) -> int:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(v for v in env if v.startswith(b"RANK=")).split(b"=", 1)[1])


def listening_ports(pid: int) -> set[int]:
    """TCP ports on which process `pid` holds a listening socket (its fds' socket inodes in its net tables)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # state LISTEN
                ports.add(int(f[1].rsplit(":", 1)[1], 16))
    return ports


def cpu_seconds(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


# -- fixtures --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served():
    launch, proc = torchrun_server()
    try:
        launch.wait_healthy()
        yield launch, proc
    finally:
        launch.close()


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks run beside this process on the same cores
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llm(one_thread):
    return LLM(dtype="float32", engine=EngineConfig(max_model_len=MAX_MODEL_LEN, kv_cache_memory=8 << 20))


@pytest.fixture
def rng():
    return random.Random(fresh_seed())


def words(rng: random.Random, n: int = 4) -> str:
    return " ".join("".join(rng.choices(string.ascii_letters, k=rng.randint(2, 7))) for _ in range(n))


def client(launch: Launch) -> "openai.OpenAI":
    return openai.OpenAI(base_url=launch.base_url + "/v1", api_key="x", max_retries=0, timeout=120)


def chat_text(c, content: str, max_tokens: int, stream: bool) -> tuple[str, str | None]:
    messages = [{"role": "user", "content": content}]
    if not stream:
        r = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0)
        return r.choices[0].message.content, r.choices[0].finish_reason
    chunks = list(c.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0,
                                            stream=True))
    return ("".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices),
            next(ch.choices[0].finish_reason for ch in reversed(chunks) if ch.choices))


def completion_text(c, prompt: str, max_tokens: int, stream: bool, **fields) -> tuple[str, str | None]:
    if not stream:
        r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, **fields)
        return r.choices[0].text, r.choices[0].finish_reason
    chunks = list(c.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, stream=True, **fields))
    return "".join(ch.choices[0].text for ch in chunks), chunks[-1].choices[0].finish_reason


# -- in one process: rank 0's messages replayed by a follower engine ------------------------------------------------

class RecordedChannel:
    """What rank 0 sends, kept (pickled, as on the wire) for a follower to replay afterwards in the same thread."""

    rank, world_size = 1, 2

    def __init__(self):
        self.sent: list[bytes] = []

    def send(self, message: tuple) -> None:
        self.sent.append(pickle.dumps(message))

    def receive(self) -> tuple:
        return pickle.loads(self.sent.pop(0))


class OwnSamples(Engine):
    """A follower engine that reads rank 0's samples but keeps its own: the negative control."""

    def __setattr__(self, name, value):
        if name == "share_samples" and value is not None:
            value = (lambda take: lambda mine: (take(mine), mine)[1])(value)
        super().__setattr__(name, value)


def test_a_follower_takes_rank_0s_steps_and_samples(one_thread, rng):
    """Sampled requests without a seed (each engine draws its own from the OS), MTP drafts, a stop string, logprobs,
    an abort and an add mid-way, and preemption (a pool too small for every request at once): a follower engine fed
    only rank 0's messages produces exactly rank 0's tokens and ends with every block free; one that kept its own
    samples would not."""
    llm = LLM(dtype="float32", engine=EngineConfig(max_model_len=64, kv_cache_memory=1 << 20, mtp=True))
    per_block = llm.engine.block_size * llm.engine.bytes_per_token
    config = EngineConfig(max_model_len=64, kv_cache_memory=4 * per_block, mtp=True, max_num_seqs=4)
    eos = llm.engine.eos_token_ids
    channel = RecordedChannel()
    leader = LeaderEngine(Engine(llm.model, llm.tokenizer, config, eos), channel, heartbeat_s=1.0)
    size = llm.engine.block_size - 2  # every sequence needs a second block within its first tokens
    prompts = [llm.tokenizer.encode(words(rng, 3 * size))[:size] for _ in range(5)]
    params = [llm.sampling(temperature=1.0, max_tokens=rng.randint(5, 10), ignore_eos=True) for _ in prompts[:3]]
    params += [llm.sampling(temperature=0, max_tokens=10, stop=["e"], logprobs=2),
               llm.sampling(temperature=0.7, top_p=0.9, max_tokens=8)]
    rids = [leader.add(p, q) for p, q in zip(prompts[:4], params[:4])]
    per_step: list[dict] = []  # each step's outputs: request id -> tokens so far
    while leader.has_unfinished:
        per_step.append({o.request_id: list(o.token_ids) for o in leader.step()})
        if len(per_step) == 2:
            assert leader.abort(rids[1])
            rids.append(leader.add(prompts[4], params[4]))
            leader.heartbeat()
    leader.close(7)
    assert {rid for outs in per_step for rid in outs} == set(rids)
    assert leader.engine.stats.preemptions > 0, "the pool was meant to be too small for every request at once"
    recorded = list(channel.sent)

    class Diverged(Exception):
        pass

    def replay(engine: Engine) -> int:
        steps = iter(per_step)

        def compare(outputs) -> None:
            if {o.request_id: list(o.token_ids) for o in outputs} != next(steps):
                raise Diverged
        channel.sent = list(recorded)
        return follow(engine, channel, compare)

    follower = Engine(llm.model, llm.tokenizer, config, eos)
    assert replay(follower) == 7  # every step's outputs equal rank 0's
    assert follower.pool.num_used == 0 == leader.engine.pool.num_used
    with pytest.raises((Diverged, RuntimeError)):  # RuntimeError: its plan drifted from rank 0's messages
        replay(OwnSamples(llm.model, llm.tokenizer, config, eos))


class FixedGather:
    def __init__(self, counts: list[int]):
        self.counts = counts

    def gather(self, value: int) -> list[int]:
        assert value == self.counts[0]  # this process is rank 0 here
        return self.counts


def test_every_rank_gets_the_fewest_cache_blocks(llm):
    per_block = llm.engine.block_size * llm.engine.bytes_per_token
    config = EngineConfig(max_model_len=64, kv_cache_memory=9 * per_block)
    holder = types.SimpleNamespace(model=llm.model, tokenizer=llm.tokenizer,
                                   engine=Engine(llm.model, llm.tokenizer, config, llm.engine.eos_token_ids))
    kept = holder.engine
    assert agree_cache_blocks(holder, FixedGather([9, 12])) == 9 and holder.engine is kept
    assert agree_cache_blocks(holder, FixedGather([9, 6])) == 6
    assert holder.engine.pool.num_blocks == 6 and holder.engine.cache_bytes == 6 * per_block
    assert holder.engine.eos_token_ids == kept.eos_token_ids and holder.engine.max_model_len == 64


# -- under torchrun --------------------------------------------------------------------------------------------------

def test_chat_and_completion_equal_one_process(served, llm, rng):
    launch, _ = served
    content, prompt = words(rng), words(rng)
    want_chat = llm.chat([{"role": "user", "content": content}], llm.sampling(temperature=0, max_tokens=4))[0]
    want = llm.generate(prompt, llm.sampling(temperature=0, max_tokens=4))[0]
    with client(launch) as c:
        for stream in (False, True):
            assert chat_text(c, content, 4, stream) == (want_chat.text, want_chat.finish_reason), stream
            assert completion_text(c, prompt, 4, stream, temperature=0) == (want.text, want.finish_reason), stream


def test_concurrent_requests_all_complete(served, llm, rng):
    launch, _ = served
    prompts = [f"{i} {words(rng, rng.randint(1, 4))}" for i in range(4)]
    max_tokens = [rng.randint(2, 5) for _ in prompts]
    seed = rng.randrange(2 ** 31)
    sampling = [{"temperature": 0.9, "top_p": 0.9, "seed": seed} if i == 3 else {"temperature": 0}
                for i in range(len(prompts))]
    want = llm.generate(prompts, [llm.sampling(max_tokens=m, **f) for m, f in zip(max_tokens, sampling)])

    async def one(c, prompt: str, m: int, fields: dict, stream: bool) -> str:
        if not stream:
            return (await c.completions.create(model=MODEL, prompt=prompt, max_tokens=m, **fields)).choices[0].text
        s = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=m, stream=True, **fields)
        return "".join([ch.choices[0].text async for ch in s])

    async def go():
        async with openai.AsyncOpenAI(base_url=launch.base_url + "/v1", api_key="x", max_retries=0,
                                      timeout=120) as c:
            return await asyncio.gather(*(one(c, p, m, f, i % 2 == 0) for i, (p, m, f) in
                                          enumerate(zip(prompts, max_tokens, sampling))))

    assert asyncio.run(go()) == [w.text for w in want]


def test_only_rank_0_listens(served):
    launch, proc = served
    ranks = {rank_of(pid): pid for pid in children(proc.pid)}
    assert sorted(ranks) == [0, 1], ranks
    assert launch.port in listening_ports(ranks[0])
    assert launch.port not in listening_ports(ranks[1])  # its listening sockets are gloo's own (loopback)
    assert not listening_ports(ranks[1]) & listening_ports(ranks[0])


def test_idle_past_the_timeout_follower_sleeps_then_serves(served, llm, rng):
    launch, proc = served
    follower = next(pid for pid in children(proc.pid) if rank_of(pid) == 1)
    before, t0 = cpu_seconds(follower), time.monotonic()
    time.sleep(DIST_TIMEOUT + 1.5)
    used, wall = cpu_seconds(follower) - before, time.monotonic() - t0
    assert used < 0.1 * wall, f"the idle follower used {used:.2f} s of CPU in {wall:.1f} s"
    prompt = words(rng)
    want = llm.generate(prompt, llm.sampling(temperature=0, max_tokens=3))[0]
    with client(launch) as c:
        assert completion_text(c, prompt, 3, False, temperature=0) == (want.text, want.finish_reason)


def test_sigterm_to_rank_0_ends_every_rank_with_status_0(served):
    launch, proc = served
    rank0 = next(pid for pid in children(proc.pid) if rank_of(pid) == 0)
    os.kill(rank0, signal.SIGTERM)
    assert proc.wait(45) == 0, launch.log()[-3000:]  # torchrun: 0 only when every rank exited 0
    assert "forcefully" not in launch.log()


# -- ranks launched by the test --------------------------------------------------------------------------------------

def test_mtp_then_a_follower_that_dies_ends_rank_0_with_one_line(llm, rng):
    launch = own_ranks("--mtp")
    try:
        launch.wait_healthy()
        prompt = words(rng)
        want = llm.generate(prompt, llm.sampling(temperature=0, max_tokens=6))[0]
        follower = launch.procs[1]
        follower.send_signal(signal.SIGTERM)  # ignored: rank 0 decides when the ranks stop
        with client(launch) as c:
            assert completion_text(c, prompt, 6, True, temperature=0) == (want.text, want.finish_reason)
        assert follower.poll() is None
        follower.kill()
        t0 = time.monotonic()
        status = launch.procs[0].wait(DIST_TIMEOUT + 20)
        elapsed = time.monotonic() - t0
        log = launch.log()
        assert status == 2, log[-3000:]
        assert log.strip().splitlines()[-1].startswith("error: rank 0 lost the other ranks"), log[-3000:]
        assert "Traceback" not in log, log[-3000:]
        assert elapsed < DIST_TIMEOUT, elapsed  # noticed by the next heartbeat (every DIST_TIMEOUT / 4 s)
    finally:
        launch.close()
