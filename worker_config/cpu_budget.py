"""How many CPUs a worker may use, and whether its torch threads fit in them.

Usable CPUs come from Celery's `cpu_budget()`: the scheduler affinity mask
(taskset, cpusets, `--cpuset-cpus`) capped by the cgroup v2 `cpu.max` / v1 CFS
quota of the container (rounded up), never the host's core count.
"""

from __future__ import annotations

from dataclasses import dataclass

from celery.utils.sysinfo import cpu_budget

from pocket_tts.threads import THREADS_ENV

CONCURRENCY_ENV = "POCKET_TTS_CONCURRENCY"
ALLOW_OVERSUBSCRIBE_ENV = "POCKET_TTS_ALLOW_OVERSUBSCRIBE"


class OversubscriptionError(RuntimeError):
    """concurrency x threads exceeds the usable CPUs and no opt-in was given."""


@dataclass(frozen=True)
class UsableCpus:
    count: int  # what the worker may use: min(affinity, ceil(cgroup quota))
    affinity: int  # CPUs in the scheduler affinity mask
    cgroup_quota: float | None  # CFS quota in CPUs, None when unlimited

    def describe(self) -> str:
        quota = "none" if self.cgroup_quota is None else f"{self.cgroup_quota:g}"
        return f"{self.count} usable CPUs (affinity mask {self.affinity}, cgroup quota {quota})"


def usable_cpus() -> UsableCpus:
    budget = cpu_budget(use_cgroup_quota=True)
    return UsableCpus(count=budget.count, affinity=budget.available, cgroup_quota=budget.quota)


def default_concurrency(cpus: UsableCpus, threads_per_child: int) -> int:
    return max(1, cpus.count // threads_per_child)


@dataclass(frozen=True)
class ThreadBudget:
    concurrency: int
    threads_per_child: int
    cpus: UsableCpus

    @property
    def torch_threads(self) -> int:
        return self.concurrency * self.threads_per_child

    @property
    def oversubscribed(self) -> bool:
        return self.torch_threads > self.cpus.count

    def describe(self) -> str:
        return (
            f"concurrency {self.concurrency} x {self.threads_per_child} torch thread(s) per child "
            f"= {self.torch_threads} threads on {self.cpus.describe()}"
        )

    def refusal(self) -> str:
        """One line naming the numbers and the ways out."""
        fitting = max(1, self.cpus.count // self.threads_per_child)
        return (
            f"refusing to start an oversubscribed worker: {self.describe()}. "
            f"Fix: lower the concurrency to {fitting} (-c / {CONCURRENCY_ENV}) or {THREADS_ENV}, "
            f"give the worker more CPUs, or set {ALLOW_OVERSUBSCRIBE_ENV}=1 to start anyway"
        )


def check_thread_budget(budget: ThreadBudget, allow_oversubscribe: bool) -> str | None:
    """Raise OversubscriptionError, or return a warning line when oversubscription was allowed."""
    if not budget.oversubscribed:
        return None
    if not allow_oversubscribe:
        raise OversubscriptionError(budget.refusal())
    return f"starting oversubscribed because {ALLOW_OVERSUBSCRIBE_ENV}=1: {budget.describe()}"
