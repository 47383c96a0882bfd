"""Per-step statistics: TEV, stability probes, throughput."""
