"""birdflow's developer tools: the bench, the fault drills, the fleet bench and the real servers that the
tests and drills start (SeaweedFS, an InfluxDB line-protocol stand-in, a fault proxy)."""
