"""Where per-slide work runs: in this process, or as tasks on a Dask distributed cluster.

Both executors run the same task functions (plain, picklable, one slide each, returning a
result instead of raising), so the serial path is the distributed path with the tasks run here,
in order. The parent process alone writes the manifest.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator

__all__ = ["SerialExecutor", "DaskExecutor", "make_executor"]

logger = logging.getLogger(__name__)


class SerialExecutor:
    """Run tasks here, one after the other, yielding ``(item, result)`` in order."""

    name = "serial"

    def map(self, fn: Callable, items: Iterable, *args) -> Iterator:
        for it in items:
            yield it, fn(it, *args)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DaskExecutor:
    """Run tasks on a Dask distributed cluster, yielding ``(item, result)`` as they finish.

    A task whose worker dies is rescheduled by the scheduler (up to ``retries`` more times on
    errors, and up to the scheduler's ``allowed-failures`` worker deaths).

    Parameters
    ----------
    client : distributed.Client
    own : bool
        Close the client (and its LocalCluster) on :meth:`close`.
    """

    name = "dask"

    def __init__(self, client, *, own: bool = False, retries: int = 2) -> None:
        self.client = client
        self.own = own
        self.retries = retries

    def map(self, fn: Callable, items: Iterable, *args) -> Iterator:
        from distributed import as_completed

        items = list(items)
        futures = [
            self.client.submit(
                fn, it, *args, pure=False, retries=self.retries, key=f"{fn.__name__}-{i}-{os.urandom(4).hex()}"
            )
            for i, it in enumerate(items)
        ]
        index = {f.key: i for i, f in enumerate(futures)}
        for fut, res in as_completed(futures, with_results=True):
            yield items[index[fut.key]], res

    def close(self) -> None:
        if self.own:
            cluster = getattr(self.client, "cluster", None)
            self.client.close()
            if cluster is not None:
                cluster.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_executor(*, workers: int = 1, scheduler: str | None = None, memory_limit: str = "auto"):
    """An executor for ``--workers N`` / ``--scheduler tcp://host:port``.

    ``workers <= 1`` without a scheduler runs here. Otherwise a LocalCluster of ``workers``
    processes shares the machine's cores (``threads_per_worker`` = cores // workers, at least 1;
    each task sets torch's threads to match) with Dask's memory limit per worker; on a machine
    with several GPUs, the default is one worker per GPU.
    """
    if scheduler:
        from distributed import Client

        return DaskExecutor(Client(scheduler), own=True)
    try:
        import torch

        n_gpu = torch.cuda.device_count()
    except Exception:  # torch missing or without CUDA: CPU workers
        n_gpu = 0
    if workers <= 1 and n_gpu <= 1:
        return SerialExecutor()
    from distributed import Client, LocalCluster

    n = workers if workers > 1 else n_gpu
    threads = max(1, (os.cpu_count() or 2) // n)
    cluster = LocalCluster(
        n_workers=n,
        threads_per_worker=1,
        processes=True,
        memory_limit=memory_limit,
        dashboard_address=None,
        env={"OMP_NUM_THREADS": str(threads), "WSI_EXPLAIN_THREADS": str(threads)},
    )
    return DaskExecutor(Client(cluster), own=True)


def worker_setup() -> str | None:
    """Inside a task: set torch's threads for this worker and pick its GPU (one per worker).
    Returns the device to use, or None (the config's)."""
    threads = os.environ.get("WSI_EXPLAIN_THREADS")
    try:
        import torch

        if threads:
            torch.set_num_threads(int(threads))
        n_gpu = torch.cuda.device_count()
    except Exception:
        return None
    if n_gpu > 1:
        try:
            from distributed import get_worker

            return f"cuda:{int(get_worker().name) % n_gpu}"
        except (ImportError, ValueError, TypeError):
            return None
    return None
