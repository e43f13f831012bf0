"""What a real deployment runs: one `Client` and one `Server`, each composed of a release
policy (what a client discloses and how) and a codec (clear or CKKS), the transport's two
endpoints, and the round that ties them together."""
