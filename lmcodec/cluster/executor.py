"""Run the codec's block work on a Ray cluster: many machines' speed, one machine's bytes.

An archive is a sequence of independent blocks, and the engine is exact
(docs/ENGINE.md): every worker computes the same bits whatever its hardware, so
a block may be coded by any worker, on a CPU or a GPU, and coded again after a
crash, without changing one byte of the archive.  :class:`RayExecutor` is the
:class:`lmcodec.executors.Executor` that sends the blocks to Ray actors.

* **Workers** are actors that keep a :class:`~lmcodec.coding.modelcache.ModelCache`:
  a model is loaded once per worker, not once per block.  Each takes one GPU
  where the cluster has GPUs, else ``threads`` CPUs.
* **Only bytes travel.**  A map puts the picklable job (settings, model spec,
  prompt, the dictionary file's bytes; never an engine or a tensor) in Ray's
  object store once, and each call carries a reference to it and one item (a
  block's raw bytes, or coded blocks); workers never open a path the driver
  did not name.
* **Bounded and in order.**  At most :data:`IN_FLIGHT_PER_WORKER` items per
  worker are out at once, read lazily from the input; results come back in
  input order.  The driver holds at most ``2 x workers`` blocks of input and of
  output, never the whole file.
* **Faults.**  A worker that dies is restarted (``max_restarts``) and its calls
  are retried (``max_task_retries``); the bytes do not change.  When retries run
  out the map raises a one-line :class:`~lmcodec.errors.ClusterError`; the CLI's
  atomic output then leaves nothing half-written.
* **Trust, but check.**  Every result carries the fingerprint of the model the
  worker used; a result whose fingerprint is not the archive header's is
  refused.  :meth:`RayExecutor.check` runs :mod:`lmcodec.coding.selftest` on every
  worker and compares its digest with :data:`lmcodec.coding.selftest.GOLDEN`.

``local[:N]`` starts a private cluster of N workers on this machine: loopback
only, Ray's token authentication on with a fresh random token, no dashboard, no
usage statistics.  Any other address is handed to ``ray.init(address=...)``.
Nothing imports this module (or Ray) unless ``--cluster`` is given.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import secrets
import sys
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from ..errors import (
    ClusterError,
    EnvironmentMismatchError,
    LMCodecError,
    ModelMismatchError,
    UsageError,
)
from ..executors import Executor
from .worker import Worker

#: Calls in flight per worker: one running and one queued behind it, so a worker
#: never waits for the driver's round trip between two blocks.  The driver holds
#: at most this many blocks per worker (input and output): 2 x 8 GPUs x 4 MiB =
#: 64 MiB for an 8-GPU cluster at the default block size.
IN_FLIGHT_PER_WORKER = 2
#: Restarts of a worker that died, and retries of each call that was running or
#: queued on it.  3 rides out an OOM kill or a preempted node or two; a block that
#: kills its worker every time fails after 4 attempts instead of looping.
#: ``LMCODEC_CLUSTER_RETRIES`` overrides both.
DEFAULT_RETRIES = 3
#: Test hook, read by the driver and handed to every worker
#: (:meth:`lmcodec.cluster.worker.Worker.exit_callback`).  Never set it in production.
TEST_EXIT_ENV = "LMCODEC_TEST_WORKER_EXIT"
#: Test-only: comma list of engine backends (``cpu`` = numba kernels, ``torch`` =
#: tensor ops) given to the workers in turn, to show that they code the same bits.
TEST_OPS_ENV = "LMCODEC_TEST_WORKER_OPS"

LOCAL = "local"
_LOG = logging.getLogger(__name__)

_LOCK = threading.Lock()
_CONNECTED: str | None = None   # the --cluster address this process's Ray runtime serves


@dataclass(frozen=True)
class Target:
    """A parsed ``--cluster`` value: a private local cluster of ``workers``, or an address."""

    address: str | None
    workers: int | None

    @property
    def local(self) -> bool:
        return self.address is None


def parse_address(value: str) -> Target:
    """``local`` (one worker per CPU), ``local:N`` (N workers) or a Ray address."""
    value = value.strip()
    if not value:
        raise UsageError("--cluster needs an address: local, local:N or a Ray address")
    if value == LOCAL or value.startswith(LOCAL + ":"):
        n = value[len(LOCAL) + 1:] if value != LOCAL else str(os.cpu_count() or 1)
        if not n.isdigit() or not 1 <= int(n) <= 1024:
            raise UsageError(f"--cluster {value}: expected local:N with N in 1..1024")
        return Target(None, int(n))
    return Target(value, None)


def retries() -> int:
    """``LMCODEC_CLUSTER_RETRIES`` (0..100), else :data:`DEFAULT_RETRIES`."""
    raw = os.environ.get("LMCODEC_CLUSTER_RETRIES", "")
    if not raw:
        return DEFAULT_RETRIES
    if not raw.isdigit() or int(raw) > 100:
        raise UsageError(f"LMCODEC_CLUSTER_RETRIES must be 0..100, not {raw!r}")
    return int(raw)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise UsageError("--cluster needs Ray: pip install 'lmcodec[cluster]'") from None
    return ray


def _private_environment() -> None:
    """Loopback only, token authentication on, no usage statistics: set before Ray starts.

    Ray takes the node's address from ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``: off,
    every server (GCS, raylet, workers, object manager) binds 127.0.0.1; on (the
    Linux default) they bind the machine's routable address.  The token is fresh
    per process and lives only in the environment the cluster's processes
    inherit (nothing is written to ``~/.ray``); a user's own ``RAY_AUTH_TOKEN``
    is kept.  Workers run at the user's priority like the in-process codec
    (Ray's default, niceness 15, keeps a dedicated node's raylet responsive,
    and starves the workers on a shared machine).  Ray reads these when it is
    imported, so a Ray imported earlier is made to read them again.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_worker_niceness", "0")
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    if "ray" in sys.modules:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
        try:
            from ray._raylet import Config
        except ImportError:  # Ray < 2.52: no token authentication to switch on
            return
        Config.initialize("")


def _start_local(ray, workers: int) -> None:
    """A private cluster of ``workers`` CPUs on this machine; refused unless it is on loopback.

    ``address="local"`` always starts a new cluster: without it Ray would join
    one named by ``RAY_ADDRESS`` or left by ``ray start`` on this machine.
    """
    ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             configure_logging=False)
    gcs = ray.get_runtime_context().gcs_address
    if not gcs.startswith(("127.0.0.1:", "[::1]:", "localhost:")):
        ray.shutdown()
        raise ClusterError(f"the local cluster listens on {gcs}, not on the loopback interface; refusing to use it")


def connect(value: str) -> Target:
    """Start (``local[:N]``) or join (an address) the process's one Ray runtime."""
    global _CONNECTED
    target = parse_address(value)
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    with _LOCK:
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            if _CONNECTED != value:
                raise UsageError(f"this process already runs Ray for --cluster {_CONNECTED!r}, not {value!r}")
            return target
        if target.local:
            _private_environment()
        ray = _import_ray()
        try:
            if target.local:
                _start_local(ray, target.workers)
            else:
                ray.init(address=target.address, log_to_driver=False, logging_level="ERROR",
                         configure_logging=False)
        except LMCodecError:
            raise
        except Exception as exc:  # ConnectionError, RuntimeError, AuthenticationError, ...
            raise ClusterError(f"cannot start or reach the Ray cluster {value!r}: {_one_line(exc)}") from exc
        _quiet_raylet_messages(ray)
        _CONNECTED = value
    return target


def _quiet_raylet_messages(ray) -> None:
    """Send the raylet's messages to the ``lmcodec.cluster.executor`` logger instead of standard output.

    Ray's driver prints the cluster's error messages ("Task Worker.run failed.
    There are 3 retries remaining ...", a worker's exit report) to
    ``sys.stdout`` from a background thread, whatever ``log_to_driver`` says:
    that is where ``lmcodec decompress -c`` writes the user's data, and a retry
    is not an error.  The listener looks the function up at every message, so
    replacing it reroutes them; every other caller is left alone.
    """
    from ray._private import worker

    original = getattr(worker, "print_to_stdstream", None)
    if original is None or getattr(original, "_lmcodec", False):
        return

    def print_to_stdstream(data, ignore_prefix: bool):
        if data.get("pid") == "raylet":
            for line in data.get("lines", []):
                _LOG.info("ray: %s", line)
            return
        original(data, ignore_prefix)

    print_to_stdstream._lmcodec = True
    worker.print_to_stdstream = print_to_stdstream


def disconnect() -> None:
    """End this process's Ray runtime (a ``local`` cluster's processes end with it)."""
    global _CONNECTED
    import ray

    with _LOCK:
        ray.shutdown()
        _CONNECTED = None


def _one_line(exc: BaseException) -> str:
    """The first line of an exception's message, without terminal colours, at most 200 characters."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return (text.splitlines() or [type(exc).__name__])[0][:200]


# -- the driver's side ---------------------------------------------------------------------------------

_END = object()


@dataclass
class _Call:
    """One item out on a worker: its pending result, and what it weighs for progress."""

    ref: Any
    worker: int
    weight: int
    result: Any = None
    done: bool = False



class RayExecutor(Executor):
    """:class:`lmcodec.executors.Executor` on Ray actors (see the module docstring).

    ``address``: ``local``, ``local:N`` or a Ray address.  ``workers``: how many
    actors (default: N for ``local:N``; else one per GPU, or one per ``threads``
    CPUs when the cluster has no GPU).  ``threads``: CPU threads per worker (1).
    ``device``: ``auto`` gives each worker a GPU when the cluster has one per
    worker.
    """

    def __init__(self, address: str, *, workers: int | None = None, threads: int | None = None,
                 device: str = "auto", model: str | None = None):
        self.address = address
        self.model = model
        target = connect(address)
        import ray

        self._ray = ray
        res = ray.cluster_resources()
        gpus, cpus = int(res.get("GPU", 0)), int(res.get("CPU", 1))
        self.threads = threads or 1
        n = workers or target.workers or (gpus if gpus and device != "cpu" else max(1, cpus // self.threads))
        use_gpu = device != "cpu" and gpus >= n
        if device == "cuda" and not use_gpu:
            raise UsageError(f"--device cuda: the cluster has {gpus} GPU(s) for {n} worker(s)")
        self.device = "cuda" if use_gpu else "cpu"
        retry = retries()
        ops = [o for o in os.environ.get(TEST_OPS_ENV, "").split(",") if o]
        remote = ray.remote(Worker).options(
            num_cpus=0 if use_gpu else self.threads, num_gpus=1 if use_gpu else 0,
            max_restarts=retry, max_task_retries=retry)
        self._workers = [remote.remote(self.threads, self.device, ops[i % len(ops)] if ops else None,
                                       os.environ.get(TEST_EXIT_ENV)) for i in range(n)]
        self._load = [0] * n            # calls out per worker (all maps together)
        self._lock = threading.Lock()
        #: Items out (running, queued or waiting for their turn) over all maps at once:
        #: files coded side by side share the bound.
        self._slots = threading.Semaphore(self.parallelism)

    @property
    def workers(self) -> int:
        return len(self._workers)

    @property
    def parallelism(self) -> int:
        """How many blocks (or files) may usefully be out at once."""
        return IN_FLIGHT_PER_WORKER * len(self._workers)

    def _pick(self) -> int:
        with self._lock:
            i = min(range(len(self._load)), key=self._load.__getitem__)
            self._load[i] += 1
            return i

    def _done(self, i: int) -> None:
        with self._lock:
            self._load[i] -= 1

    def map(self, job, items: Iterable, progress) -> Iterator:
        """``job(context, item)`` for every item on the workers; results in input order.

        Items are pulled from ``items`` only while fewer than :attr:`parallelism`
        are out (over all maps running at once, e.g. files coded side by side),
        so the input is read as fast as the workers code it; progress
        moves by a whole item (``job.weight``) as its result is handed on.
        """
        ray = self._ray
        shared = ray.put(job)   # once per map: the settings, prompt and dictionary do not travel per block
        source = iter(items)
        out: collections.deque[_Call] = collections.deque()   # in input order
        running: dict = {}                                     # ref -> call, until its result is in
        index, exhausted = 0, False
        try:
            while True:
                while not exhausted and self._slots.acquire(blocking=not out):   # wait only when idle
                    try:
                        item = next(source, _END)
                    except BaseException:
                        self._slots.release()
                        raise
                    if item is _END:
                        self._slots.release()
                        exhausted = True
                        break
                    w = self._pick()
                    call = _Call(self._workers[w].run.remote(index, shared, item), w, job.weight(item))
                    index += 1
                    out.append(call)
                    running[call.ref] = call
                if not out:
                    return
                while not out[0].done:
                    ready, _ = ray.wait(list(running), num_returns=1)
                    for ref in ready:
                        call = running.pop(ref)
                        self._done(call.worker)
                        call.result, call.done = self._result(ref, job.model_check), True
                call = out.popleft()
                self._slots.release()
                progress.bytes(call.weight)
                yield call.result
        finally:   # an error or a consumer that stopped early: nothing keeps running for it
            for _ in out:
                self._slots.release()
            for call in running.values():
                self._done(call.worker)
                try:
                    ray.cancel(call.ref)   # queued calls are dropped; a running one finishes unread
                except Exception:          # its worker is gone already
                    pass

    def _result(self, ref, expected: bytes | None) -> Any:
        """The worker's result, after the fingerprint check; Ray's failures as one-line errors."""
        ray = self._ray
        try:
            fingerprint, result = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause
            if isinstance(cause, LMCodecError):
                raise type(cause)(*cause.args) from None
            raise ClusterError(f"a worker failed: {type(cause).__name__}: {_one_line(cause)}") from None
        except ray.exceptions.RayError as exc:
            raise ClusterError(f"a block could not be coded: its worker died and {retries()} retries ran out "
                               f"({type(exc).__name__}: {_one_line(exc)})") from None
        if expected is not None and fingerprint[:len(expected)] != expected:
            raise ModelMismatchError(f"a worker used model {fingerprint.hex()[:16]}, not the archive's "
                                     f"{expected.hex()[:16]}: the cluster's workers have another model")
        return result

    def warm_up(self) -> None:
        """Every worker loads the model now (a benchmark times the coding, not the loading)."""
        self._ray.get([w.load.remote(self.model) for w in self._workers])

    def check(self) -> list[dict]:
        """Run the self-test on every worker; raise unless each matches :data:`selftest.GOLDEN`.

        Returns the workers' reports (host, pid, device, model, fingerprint, digest).
        """
        from ..coding import selftest

        ray = self._ray
        try:
            reports = ray.get([w.selftest.remote(self.model) for w in self._workers])
        except ray.exceptions.RayError as exc:
            raise ClusterError(f"the cluster's self-test failed: {_one_line(exc)}") from None
        for r in reports:
            golden = selftest.GOLDEN.get(r["fingerprint"])
            if not r["steps_agree"] or (golden is not None and r["digest"] != golden):
                raise EnvironmentMismatchError(
                    f"worker {r['host']}:{r['pid']} ({r['device']}) does not compute the exact engine's bits "
                    f"(digest {r['digest'][:16]}, expected {(golden or '?')[:16]}): remove it from the cluster")
        return reports

    def close(self) -> None:
        """End this executor's workers (the Ray runtime ends with the process)."""
        for w in self._workers:
            try:
                self._ray.kill(w)
            except Exception:  # already gone
                pass
        self._workers = []


