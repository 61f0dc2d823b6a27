"""Benchmarks (installed as fastmodels.bench). See harness.py; cases live in bench_<op>.py."""
