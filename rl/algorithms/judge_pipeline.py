"""A step's rollout in chunks, each chunk judged once it is made: after the rollout, or overlapped with it.

`sampler.rollout_chunk` splits a process's share of the step's images into chunks of that many (0 = one
chunk, the whole share); the rollout generates and decodes them in order and hands each chunk's images
to `ChunkJudging.submit`. What happens to them is `judge.overlap`'s choice:

- false: they wait; `result()` (the step's judge phase) has the judge score them chunk after chunk on
  the calling thread. With one chunk that is exactly the one judge call of a step without chunks.
- true: one background thread scores each chunk as soon as it is submitted, while the calling thread
  generates the next chunk; `result()` waits for what is left.

Either way the judge gets the same calls (one `score` per chunk, the chunk's every image and dimension)
in the same order, one at a time, so a deterministic judge returns the same scores and the step is the
same, bit for bit: overlap changes when the judge works, not what it is asked. Chunking itself changes
the rollout's batch shapes, and floating-point results are not batch-size invariant on every backend
(measured on CPU: ~2e-6 in the latents), so the chunk size, not the overlap, is what a resume may not
change.

Why within a step and not across steps: the next step's rollout must come from the policy after this
step's update (on-policy; NFT's sampling policy follows the trained one every step, GRPO's ratio is 1
only at the sampling policy). Scoring step k while generating step k + 1 would sample from a policy one
update stale, a different (asynchronous, off-policy) algorithm. Overlapping the chunks of one step keeps
every image, score and update of the synchronous step; what it cannot hide is the judging of the last
chunk (and the generation of the first), so more chunks overlap more, at the price of smaller batches.

Failures: a chunk's exception (a JudgeError after the judge's own retries, or any other) is raised, as
itself, on the calling thread at the next `submit` or at `result`; the chunks still queued are dropped
and the thread ends. Nothing turns a failure into a score. Scores come back in chunk order.

It pays where the judge works outside the rollout's compute: a served judge (vLLM, `reward.serve`:
the thread waits on HTTP, which releases the GIL) or an in-process VLM on its own GPU. The rule judge
computes on the CPU the rollout uses: there overlap only adds a thread's overhead.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future

import torch
from torch import Tensor

from reward.judge import Judge
from rl.algorithms.reward_scoring import ScoreTable, judge_images


def rollout_chunks(n: int, size: int) -> list[slice]:
    """Consecutive slices of n items, `size` each (the last may be shorter); size 0 = one slice."""
    size = size or n
    return [slice(i, min(i + size, n)) for i in range(0, n, size)] or [slice(0, 0)]


class ChunkJudging:
    """The judging of one step's rollout chunks (see the module docstring); use once, then `result()`."""

    def __init__(self, judge: Judge, mode: str, overlap: bool):
        self.judge, self.mode, self.overlap = judge, mode, overlap
        self._chunks: list = []           # overlap: Futures; otherwise (samples, images) waiting
        self._queue: queue.SimpleQueue | None = None
        self._closed = False

    # -- the rollout's side ------------------------------------------------------------------
    def submit(self, samples: list, images: Tensor, others: Tensor | None = None) -> None:
        """One chunk's conditions and decoded images [n, 3, H, W] (pairwise: and the images they are
        compared with); raises a failure of an earlier chunk."""
        if self._closed:
            raise RuntimeError("ChunkJudging.submit after result() or close()")
        self.raise_failure()
        if not self.overlap:
            self._chunks.append((samples, images, others))
            return
        if self._queue is None:
            self._start()
        future: Future = Future()
        self._chunks.append(future)
        self._queue.put((future, samples, images, others))

    def raise_failure(self) -> None:
        """Raise the first failure of a chunk already judged (overlap), so a dead judge stops the step early."""
        for f in self._chunks:
            if isinstance(f, Future) and f.done() and not f.cancelled() and f.exception() is not None:
                self.close()
                raise f.exception()

    # -- the step's judge phase --------------------------------------------------------------
    def result(self) -> tuple[ScoreTable, float | None, float]:
        """(the scores of every chunk as one table in rollout order, the share of floored labels of a
        served judge (None for judges without floors), the judge's busy seconds over the chunks)."""
        try:
            if self.overlap:
                answers = [f.result() for f in self._chunks]
            else:
                answers = [self._score(*chunk) for chunk in self._chunks]
        finally:
            self.close()
        tables = [a[0] for a in answers]
        shares = [a[1] for a in answers]
        floored = None
        if shares and all(s is not None for s in shares):
            counts = [len(t.per_request) for t in tables]
            floored = sum(s * c for s, c in zip(shares, counts)) / max(sum(counts), 1)
        return ScoreTable.cat(tables), floored, sum(a[2] for a in answers)

    def close(self) -> None:
        """Drop the chunks not yet judged and let the thread end (it finishes the chunk in hand)."""
        if self._closed:
            return
        self._closed = True
        for f in self._chunks:
            if isinstance(f, Future):
                f.cancel()
        if self._queue is not None:
            self._queue.put(None)

    # -- the judge's side --------------------------------------------------------------------
    def _score(self, samples: list, images: Tensor, others: Tensor | None) -> tuple[ScoreTable, float | None, float]:
        tic = time.perf_counter()
        with torch.no_grad():  # grad mode is per thread: the worker's must be off too
            table = judge_images(self.judge, samples, images, mode=self.mode, others=others)
        return table, getattr(self.judge, "last_floored_share", None), time.perf_counter() - tic

    def _start(self) -> None:
        self._queue = queue.SimpleQueue()
        # the current CUDA device is per thread: the worker uses the caller's (a process's own GPU)
        device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        # a daemon thread: an interrupted run does not wait at exit for a judge call in flight
        threading.Thread(target=self._work, args=(self._queue, device), name="judge-overlap", daemon=True).start()

    def _work(self, jobs: queue.SimpleQueue, device: int | None) -> None:
        if device is not None:
            torch.cuda.set_device(device)
        while True:
            job = jobs.get()
            if job is None:
                return
            future, *chunk = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self._score(*chunk))
            except BaseException as err:  # noqa: BLE001 - handed to the caller, raised there as itself
                future.set_exception(err)
