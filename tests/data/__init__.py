"""Tests of mlra_mega.data."""
