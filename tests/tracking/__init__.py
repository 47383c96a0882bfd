"""Tests of mlra_mega.tracking."""
