"""Tests of mlra_mega.metrics."""
