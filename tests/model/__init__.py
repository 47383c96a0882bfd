"""Tests of mlra_mega.model."""
