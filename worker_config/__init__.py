"""The one place that reads the worker service's settings from the environment."""

from worker_config.cpu_budget import OversubscriptionError, ThreadBudget, UsableCpus, check_thread_budget, usable_cpus
from worker_config.settings import Settings, SettingsError, current_settings, load_settings

__all__ = [
    "OversubscriptionError",
    "Settings",
    "SettingsError",
    "ThreadBudget",
    "UsableCpus",
    "check_thread_budget",
    "current_settings",
    "load_settings",
    "usable_cpus",
]
