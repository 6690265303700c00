"""Prefect flows and the `gptpipe` command line: orchestration only, the work itself lives in components/."""
