"""Speed against torchvision (bench.py, bench_pairs.py) and the scripts a GPU machine runs (gpu_check.sh,
gpu_endpoint.sh). Run from the repository root: `python -m tools.bench`, `bash tools/gpu_check.sh`."""
