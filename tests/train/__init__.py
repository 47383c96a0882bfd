"""Tests of mlra_mega.train."""
