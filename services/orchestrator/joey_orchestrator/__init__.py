"""The orchestrator: packages orchestrations into virtual environments and runs tasks (once, on a
cron schedule, continuously), each run a process group of its own with a token scoped to its workspace."""
