"""mlra_mega's test suite; mirrors the package layout."""
