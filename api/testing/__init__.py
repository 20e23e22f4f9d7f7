"""Harnesses for tests, benchmarks and demos: real processes on loopback, never mocks."""
