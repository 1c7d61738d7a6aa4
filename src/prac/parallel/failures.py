"""The failure protocol of a data-parallel run, on the launcher's key-value store.

A rank that fails posts its one-line error and exit code there (:class:`FailureBoard`); every
collective is issued asynchronously and polled (:meth:`prac.parallel.session.Session.wait`), so the
other ranks see the post within ~50 ms, raise :class:`PeerFailed` and exit with the same code without
printing. An atomic counter makes the first failing rank the only one that prints, so an error every
rank hits (bad input) appears once.
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta

import torch.distributed as dist

from prac.core.errors import PracError
from prac.parallel.launch import Launch

_POLL_STORE_S = 0.05


class PeerFailed(Exception):
    """Another rank failed (and printed the error); this one stops silently with the same exit code."""

    def __init__(self, rank: int, message: str, code: int):
        super().__init__(f"process {rank} failed: {message}")
        self.rank, self.message, self.code = rank, message, code


class FailureBoard:
    """The failure protocol on the launcher's TCP key-value store (see the module docstring).

    Keys live under ``prac/<restart count>/`` so a restarted worker group starts clean."""

    ACK_WAIT_S = 5.0

    def __init__(self, store: dist.Store, launch: Launch, prefix: str = "prac/0/"):
        self.store, self.launch, self.prefix = store, launch, prefix
        self._next_check = 0.0

    @classmethod
    def connect(cls, launch: Launch, timeout: float) -> FailureBoard:
        """A client of the store torchrun's agent runs (``TORCHELASTIC_USE_AGENT_STORE``), else rank 0
        hosts one at ``MASTER_ADDR:MASTER_PORT`` (as ``init_process_group``'s ``env://`` does)."""
        try:
            host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        except (KeyError, ValueError) as exc:
            raise PracError("WORLD_SIZE > 1 but MASTER_ADDR/MASTER_PORT are not set: start prac with torchrun") from exc
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(host, port, launch.world, is_master=launch.is_main and not agent,
                              timeout=timedelta(seconds=timeout), wait_for_workers=False)
        return cls(store, launch, f"prac/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/")

    def _key(self, name: str) -> str:
        return self.prefix + name

    def fail(self, code: int, message: str) -> bool:
        """Post this rank's failure; True when it is the first (the one that prints).

        The first failing rank then waits (at most :attr:`ACK_WAIT_S`) for every rank to acknowledge,
        so the others stop on the post rather than on the launcher killing them."""
        try:
            first = self.store.add(self._key("failures"), 1) == 1
            if first:
                self.store.set(self._key("error"),
                               json.dumps({"rank": self.launch.rank, "message": message, "code": code}))
            self.store.add(self._key("stopped"), 1)
            if first:
                deadline = time.monotonic() + self.ACK_WAIT_S
                while self.store.add(self._key("stopped"), 0) < self.launch.world and time.monotonic() < deadline:
                    time.sleep(0.01)
            return first
        except Exception:  # the store is gone: say it here rather than not at all
            return True

    def check(self, force: bool = False) -> None:
        """Raise :class:`PeerFailed` if some rank has posted a failure (the store is asked at most every 50 ms)."""
        now = time.monotonic()
        if not force and now < self._next_check:
            return
        self._next_check = now + _POLL_STORE_S
        if self.store.check([self._key("failures")]):
            info = json.loads(self.store.get(self._key("error")))
            raise PeerFailed(int(info["rank"]), str(info["message"]), int(info["code"]))
