"""The command-line front ends of the pipeline (`resnas train-supernet`, `train-subnet`, `search`, `export`, `demo`):
argument parsing, error reporting and exit codes only. The work is done by the library modules of
`resnas_kernels.search`, which never import these."""
