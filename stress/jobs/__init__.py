"""The jobs: a run, soaks (epochs of fresh seeds), the variant zoo, campaign matrices
and their shards, benchmarks; each one supervised run after another."""
