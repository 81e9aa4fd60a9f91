"""The benchmarks and checks: run each from the repository root as ``python -m bench.NAME`` (``--help``
says what it measures). `bench.harness` times and records them, `bench._common` builds what they run on,
`bench.reference_gptq` is their eager GPTQ yardstick."""
